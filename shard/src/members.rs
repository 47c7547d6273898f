//! `MEMBERS`: a replica's committed membership as of a log index.
//!
//! Membership changes are entries of the log ([`crate::raft::ConfChange`]), and a replica's log
//! loses its oldest segments once a checkpoint covers them (or all of them, when a snapshot
//! replaces the log). So that the configuration does not go with them, a replica writes the
//! membership committed at its commit index to `shard-NNN/MEMBERS` whenever it changes, and a
//! snapshot's install writes the snapshot's membership, before any segment is deleted (the
//! same write, first step: temp file, fsync, rename, directory fsync). Recovery starts from the
//! file (or, without one, from the group's voters at creation) and applies the conf entries of
//! the retained log above its index.
//!
//! ```text
//! MEMBERS = magic "FABRMEMB" | format:u32le | shard:u32le | index:u64le
//!         | voters:u32le | learners:u32le | id:u64le * (voters + learners) | crc:u32le
//! ```

use crate::raft::{Membership, NodeId};

pub const MEMBERS_FILE: &str = "MEMBERS";
pub const MEMBERS_MAGIC: &[u8; 8] = b"FABRMEMB";
/// The format this code writes and reads; another is refused by name.
pub const MEMBERS_FORMAT: u32 = 1;
/// A group's members (voters and learners) at most: the Raft core's limit (an add past it
/// does not apply), which bounds the file.
pub const MEMBERS_NODES_MAX: usize = crate::raft::MEMBERS_MAX;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4 + 4;

/// The membership committed at `index` in shard `shard`'s group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersFile {
    pub shard: u32,
    pub index: u64,
    pub membership: Membership,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MembersError {
    #[error("it is {0} bytes, not a whole membership file")]
    Length(usize),
    #[error("its magic is not FABRMEMB")]
    Magic,
    #[error("its format is {0}; this node reads format {MEMBERS_FORMAT}")]
    Format(u32),
    #[error("its checksum does not match")]
    Checksum,
    #[error("it belongs to shard {found}, but this is shard {expected}")]
    Shard { found: u32, expected: u32 },
    #[error("it lists {0} members; the limit is {MEMBERS_NODES_MAX}")]
    TooMany(usize),
    #[error("it lists no voter, node id 0, or a node twice")]
    Invalid,
}

impl MembersFile {
    pub fn encode(&self) -> Vec<u8> {
        let m = &self.membership;
        assert!(m.voters.len() + m.learners.len() <= MEMBERS_NODES_MAX);
        let mut b = Vec::with_capacity(HEADER_BYTES + 8 * MEMBERS_NODES_MAX + 4);
        b.extend_from_slice(MEMBERS_MAGIC);
        b.extend_from_slice(&MEMBERS_FORMAT.to_le_bytes());
        b.extend_from_slice(&self.shard.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&(m.voters.len() as u32).to_le_bytes());
        b.extend_from_slice(&(m.learners.len() as u32).to_le_bytes());
        for id in m.voters.iter().chain(m.learners.iter()) {
            b.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// The file of shard `shard`; anything else is an error (recovery refuses to start: the
    /// group's configuration is not something to guess).
    pub fn decode(b: &[u8], shard: u32) -> Result<MembersFile, MembersError> {
        if b.len() < HEADER_BYTES + 4 {
            return Err(MembersError::Length(b.len()));
        }
        if &b[0..8] != MEMBERS_MAGIC {
            return Err(MembersError::Magic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        if u32_at(8) != MEMBERS_FORMAT {
            return Err(MembersError::Format(u32_at(8)));
        }
        let (voters, learners) = (u32_at(24) as usize, u32_at(28) as usize);
        let count = voters.saturating_add(learners);
        if count > MEMBERS_NODES_MAX {
            return Err(MembersError::TooMany(count));
        }
        let end = HEADER_BYTES + 8 * count;
        if b.len() != end + 4 {
            return Err(MembersError::Length(b.len()));
        }
        if crc32c::crc32c(&b[..end]) != u32_at(end) {
            return Err(MembersError::Checksum);
        }
        if u32_at(12) != shard {
            return Err(MembersError::Shard {
                found: u32_at(12),
                expected: shard,
            });
        }
        let ids: Vec<NodeId> = (0..count).map(|i| u64_at(HEADER_BYTES + 8 * i)).collect();
        let membership = Membership {
            voters: ids[..voters].iter().copied().collect(),
            learners: ids[voters..].iter().copied().collect(),
        };
        let distinct = membership.voters.len() + membership.learners.len() == count
            && membership.voters.is_disjoint(&membership.learners);
        if voters == 0 || ids.contains(&0) || !distinct {
            return Err(MembersError::Invalid);
        }
        Ok(MembersFile {
            shard,
            index: u64_at(16),
            membership,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> MembersFile {
        MembersFile {
            shard: 3,
            index: 42,
            membership: Membership {
                voters: [1, 2, 4].into_iter().collect(),
                learners: [5].into_iter().collect(),
            },
        }
    }

    #[test]
    fn a_membership_file_reads_back_as_written() {
        // Proves encode and decode are inverses, the shard and index included.
        let f = file();
        assert_eq!(MembersFile::decode(&f.encode(), 3), Ok(f));
    }

    #[test]
    fn any_flipped_bit_or_cut_is_refused_never_misread() {
        // Proves every single-bit flip and every truncation is an error, not another
        // membership (a wrong configuration would let a minority elect a leader).
        let b = file().encode();
        for i in 0..b.len() * 8 {
            let mut d = b.clone();
            d[i / 8] ^= 1 << (i % 8);
            assert!(MembersFile::decode(&d, 3).is_err(), "bit {i}");
        }
        for len in 0..b.len() {
            assert!(MembersFile::decode(&b[..len], 3).is_err(), "len {len}");
        }
    }

    #[test]
    fn a_file_of_another_shard_or_format_is_refused_by_name() {
        // Proves a file copied from another shard, or written by another version, is named.
        let b = file().encode();
        assert_eq!(
            MembersFile::decode(&b, 4),
            Err(MembersError::Shard {
                found: 3,
                expected: 4
            })
        );
        let mut d = b.clone();
        d[8] = 9;
        let end = d.len() - 4;
        let crc = crc32c::crc32c(&d[..end]);
        d[end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(MembersFile::decode(&d, 3), Err(MembersError::Format(9)));
    }
}
