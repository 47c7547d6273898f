//! Protocol-aware recovery of a replica whose log is damaged where no torn write can be
//! (a bit flip in a synced frame, a damaged segment header).
//!
//! A single node must refuse to start: the damaged records were acknowledged and no other copy
//! exists. A replica of a group of 3 or 5 has other copies, so it may cut its log at the
//! damage (keeping the cut bytes in `quarantine/`) and fetch the rest from the leader, on one
//! condition: it must not vote or lead until its log again holds every entry it may have
//! acknowledged. Its old acknowledgements may have helped commit entries it has now lost; a
//! vote cast with the shortened log could elect a leader that lacks them.
//!
//! "Every entry it may have acknowledged" is bounded by what its files hold (a follower
//! acknowledges only what it wrote and synced): the LSNs intact frame headers in the cut bytes
//! name, plus one record for every [`RECORD_HEADER_BYTES`] no intact frame covers
//! ([`acked_bound`]). Recovery writes that bound, `through`, into the shard's
//! `REPAIR` file before it cuts anything (temp file, fsync, rename, directory fsync), so a crash
//! during or after the cut restarts in repair all the same. The Raft core
//! ([`crate::raft::RaftCore::begin_repair`]) grants no vote or pre-vote, never campaigns and
//! ignores `TimeoutNow` until entries through `through` are durable here; they can only come
//! from a leader, whose log holds every committed entry. Why the group stays safe: a quorum
//! that commits an entry and a quorum that elects a later leader intersect even with every
//! repairing node left out of both, so some voter of every later election still holds the entry.
//!
//! ```text
//! REPAIR (36 bytes) = magic "FABRREPR" | shard:u32le | from_lsn:u64le | through_lsn:u64le
//!                     | reserved:u32le (0) | crc:u32le (crc32c of everything before it)
//! ```

use crate::wal::{
    FrameHeader, FRAME_HEADER_BYTES, FRAME_MAGIC, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};

/// The repair marker's file name, in the shard's directory.
pub const REPAIR_FILE: &str = "REPAIR";
/// The temp file it is written through.
pub const REPAIR_TEMP_FILE: &str = "REPAIR.tmp";
pub const REPAIR_MAGIC: &[u8; 8] = b"FABRREPR";
pub const REPAIR_BYTES: usize = 8 + 4 + 8 + 8 + 4 + 4;

/// What a replica in repair must fetch before it may vote again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairMarker {
    pub shard: u32,
    /// The first LSN cut (the damaged record's).
    pub from_lsn: u64,
    /// The highest LSN the cut files named: the replica may have acknowledged up to here.
    pub through_lsn: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairMarkerError {
    #[error("{0} bytes where {REPAIR_BYTES} were expected")]
    Length(usize),
    #[error("no repair marker magic")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("it names shard {found}, but this is shard {expected}")]
    Shard { found: u32, expected: u32 },
    #[error("it cuts from lsn {from} but names lsn {through} as the last")]
    Range { from: u64, through: u64 },
}

impl RepairMarker {
    pub fn encode(&self) -> [u8; REPAIR_BYTES] {
        let mut b = [0u8; REPAIR_BYTES];
        b[0..8].copy_from_slice(REPAIR_MAGIC);
        b[8..12].copy_from_slice(&self.shard.to_le_bytes());
        b[12..20].copy_from_slice(&self.from_lsn.to_le_bytes());
        b[20..28].copy_from_slice(&self.through_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A marker of shard `shard`; a damaged one is an error (recovery refuses to start: it
    /// cannot tell how much the replica must fetch).
    pub fn decode(b: &[u8], shard: u32) -> Result<RepairMarker, RepairMarkerError> {
        if b.len() != REPAIR_BYTES {
            return Err(RepairMarkerError::Length(b.len()));
        }
        if &b[0..8] != REPAIR_MAGIC {
            return Err(RepairMarkerError::Magic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        if crc32c::crc32c(&b[..32]) != u32_at(32) {
            return Err(RepairMarkerError::Checksum);
        }
        let m = RepairMarker {
            shard: u32_at(8),
            from_lsn: u64_at(12),
            through_lsn: u64_at(20),
        };
        if m.shard != shard {
            return Err(RepairMarkerError::Shard {
                found: m.shard,
                expected: shard,
            });
        }
        if m.from_lsn == 0 || m.through_lsn + 1 < m.from_lsn {
            return Err(RepairMarkerError::Range {
                from: m.from_lsn,
                through: m.through_lsn,
            });
        }
        Ok(m)
    }

    /// The marker covering both this one's range and `other`'s.
    pub fn merge(self, other: RepairMarker) -> RepairMarker {
        RepairMarker {
            shard: self.shard,
            from_lsn: self.from_lsn.min(other.from_lsn),
            through_lsn: self.through_lsn.max(other.through_lsn),
        }
    }
}

/// The highest LSN a replica may have acknowledged from the damaged bytes `bytes[from..]`,
/// given that the log before them ends at `lsn_floor`. Intact frame headers name their LSNs
/// (a frame header carries its own checksum and a magic no message body can hold, so damage
/// cannot forge one). Bytes after the last intact frame may hold frames whose headers the
/// damage hid: each record takes at least [`RECORD_HEADER_BYTES`], so they hold at most that
/// many records, and the bound counts them all.
pub fn acked_bound(bytes: &[u8], from: usize, lsn_floor: u64) -> u64 {
    let mut named = lsn_floor;
    let mut covered_end = from.min(bytes.len());
    let mut at = from;
    while at + FRAME_HEADER_BYTES <= bytes.len() {
        let Some(hit) = bytes[at..].windows(4).position(|w| w == FRAME_MAGIC) else {
            break;
        };
        at += hit;
        if let Some(h) = FrameHeader::decode(&bytes[at..]) {
            let last = h
                .first_lsn
                .saturating_add(u64::from(h.records))
                .saturating_sub(1);
            named = named.max(last);
            covered_end = covered_end.max(at + FRAME_HEADER_BYTES + h.len as usize);
        }
        at += 1;
    }
    let unnamed = bytes.len().saturating_sub(covered_end) / RECORD_HEADER_BYTES;
    named.saturating_add(unnamed as u64)
}

/// [`acked_bound`] of a whole segment cut after the damage, the log before it ending at
/// `lsn_floor` (its header, if intact, says where it started).
pub fn acked_bound_of_segment(bytes: &[u8], lsn_floor: u64) -> u64 {
    match crate::wal::SegmentHeader::decode(bytes) {
        Ok(h) => acked_bound(
            bytes,
            SEGMENT_HEADER_BYTES,
            lsn_floor.max(h.first_lsn.saturating_sub(1)),
        ),
        Err(_) => acked_bound(bytes, 0, lsn_floor),
    }
}

#[cfg(test)]
mod tests;
