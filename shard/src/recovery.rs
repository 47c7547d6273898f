//! Rebuilding a shard from its segments, and what recovery may cut.
//!
//! The rules (docs/OPERATIONS.md, "Recovery"):
//! - Damage may be cut only in the newest listed segment, and only when the damaged write and
//!   every byte after it lie inside the final write: no intact frame header follows it, and
//!   it is no longer than one write can be (`wal_batch_bytes_max` plus one record). That
//!   write was never synced (a completed fdatasync cannot be torn by a power loss), so it
//!   holds nothing acknowledged. The cut bytes are kept in `quarantine/`, never destroyed.
//! - Anything else (damage in a sealed segment or an earlier write, a checksummed record or
//!   frame out of LSN sequence, a damaged segment header of a listed segment) refuses to
//!   start, naming the file and byte offset.
//! - A segment newer than the manifest lists is an incomplete creation (its header is written
//!   before the manifest lists it, and records only after): if it holds no frame it is
//!   quarantined and removed; if it holds one, recovery refuses.

use crate::store::StoreError;
use crate::wal::{self, Damage, SegmentHeader};
use crate::{SegmentInfo, Shard, ShardConfig};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("WAL corrupt in {file} at byte {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("WAL segment {file} is out of order: segment {id} after {previous}")]
    OutOfOrder {
        file: String,
        id: u64,
        previous: u64,
    },
    /// The manifest and the segments on disk disagree, or the manifest is missing or damaged.
    #[error("shard directory inconsistent: {0}")]
    Manifest(String),
    /// Data of a WAL format this node does not read.
    #[error("{file}: {reason}")]
    Format { file: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why damage may not be cut (recovery refuses to start, naming the file and offset).
#[derive(Debug, thiserror::Error)]
enum CutRefused {
    #[error("{reason}, in a segment that is not the newest")]
    NotNewest { reason: String },
    #[error("{reason} (no torn write looks like this)")]
    NotTorn { reason: String },
    #[error(
        "{reason}; an intact write follows at byte {later}, so the damaged write was synced and \
         acknowledged"
    )]
    IntactWriteFollows { reason: String, later: usize },
    #[error(
        "{reason}; the {tail} bytes from here to the end of the file are more than one write can \
         hold ({write_max}), so the damage is not in the final write"
    )]
    LongerThanOneWrite {
        reason: String,
        tail: u64,
        write_max: u64,
    },
}

/// Bytes recovery cuts from the newest segment (after keeping them in quarantine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub segment: u64,
    /// The segment keeps `[0, offset)`.
    pub offset: u64,
    /// Bytes cut.
    pub bytes: u64,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    /// A damaged final write cut from the newest segment.
    pub cut: Option<Cut>,
    /// Why it was cut.
    pub cut_reason: Option<String>,
    /// Files written under `quarantine/` (cut bytes, incomplete segments).
    pub quarantined: Vec<String>,
    /// An incompletely created segment that was removed (after quarantine).
    pub incomplete_segment: Option<u64>,
    /// Retired segments (no longer in the manifest) whose deletion recovery finished.
    pub retired_removed: Vec<u64>,
}

/// Rebuilds a shard from its listed segments, oldest first. Pure: [`crate::store::recover`]
/// reads the files and carries out the cuts it reports.
pub struct Recoverer {
    shard: Shard,
    expect_lsn: Option<u64>,
    last_segment: Option<u64>,
    report: RecoveryReport,
}

impl Recoverer {
    pub fn new(config: ShardConfig) -> Recoverer {
        Recoverer {
            shard: Shard::replaying(config),
            expect_lsn: None,
            last_segment: None,
            report: RecoveryReport::default(),
        }
    }

    /// The most bytes one write can hold: recovery never cuts more than this.
    pub fn write_bytes_max(&self) -> u64 {
        (self.shard.config.wal_batch_bytes_max + wal::RECORD_BYTES_MAX + wal::FRAME_HEADER_BYTES)
            as u64
    }

    /// Feeds one listed segment. `newest` says it is the newest listed one: only there may a
    /// damaged final write be cut (reported in the report's `cut`).
    pub fn handle_segment(
        &mut self,
        id: u64,
        file: &str,
        bytes: &[u8],
        newest: bool,
    ) -> Result<(), RecoverError> {
        self.check_order(id, file)?;
        let corrupt = |offset: u64, reason: String| RecoverError::Corrupt {
            file: file.to_string(),
            offset,
            reason,
        };
        let header =
            SegmentHeader::decode(bytes).map_err(|e| corrupt(0, format!("segment header: {e}")))?;
        self.check_header(&header, id, file)?;
        let expect = self.expect_lsn.unwrap_or(header.first_lsn);
        let skip_crc = self.shard.config.planted.skip_crc_on_recovery;
        let scan = wal::scan_frames(bytes, expect, skip_crc);
        if let Some((at, damage)) = &scan.damage {
            let next = scan.records.last().map_or(expect, |r| r.lsn + 1);
            self.may_cut(bytes, *at, damage, next, newest)
                .map_err(|refused| corrupt(*at, refused.to_string()))?;
            self.report.cut = Some(crate::recovery::Cut {
                segment: id,
                offset: *at,
                bytes: bytes.len() as u64 - *at,
            });
            self.report.cut_reason = Some(damage.reason().to_string());
        }
        let first_lsn = header.first_lsn;
        let mut last_lsn = first_lsn - 1;
        for rec in scan.records {
            if rec.term < self.shard.term {
                // The scan checks terms within a segment; this is the check across segments.
                let reason = format!(
                    "record lsn {} has term {} after a record of term {} (terms never \
                     decrease along the log)",
                    rec.lsn, rec.term, self.shard.term
                );
                return Err(corrupt(rec.offset, reason));
            }
            self.shard.term = rec.term;
            last_lsn = rec.lsn;
            self.report.records += 1;
            self.shard.replay_at = (id, rec.frame, rec.offset);
            self.shard.apply(rec.lsn, rec.record);
        }
        self.shard.next_lsn = last_lsn + 1;
        self.expect_lsn = Some(last_lsn + 1);
        self.shard.segments.push_back(SegmentInfo {
            id,
            first_lsn,
            last_lsn,
            bytes: scan.valid_len,
        });
        self.shard.wal_bytes += scan.valid_len;
        self.report.segments += 1;
        self.report.bytes += scan.valid_len;
        Ok(())
    }

    fn check_order(&mut self, id: u64, file: &str) -> Result<(), RecoverError> {
        if let Some(prev) = self.last_segment {
            if id <= prev {
                return Err(RecoverError::OutOfOrder {
                    file: file.to_string(),
                    id,
                    previous: prev,
                });
            }
        }
        self.last_segment = Some(id);
        Ok(())
    }

    fn check_header(&self, h: &SegmentHeader, id: u64, file: &str) -> Result<(), RecoverError> {
        let corrupt = |reason: String| RecoverError::Corrupt {
            file: file.to_string(),
            offset: 0,
            reason,
        };
        if h.shard != self.shard.config.shard {
            return Err(corrupt(format!(
                "segment header names shard {}, but this is shard {}",
                h.shard, self.shard.config.shard
            )));
        }
        if h.segment != id {
            return Err(corrupt(format!(
                "segment header names segment {}, but the file name says {id}",
                h.segment
            )));
        }
        match self.expect_lsn {
            Some(expect) if h.first_lsn != expect => Err(corrupt(format!(
                "segment starts at lsn {} where {expect} was expected: a segment is missing \
                 or was replaced",
                h.first_lsn
            ))),
            _ if h.first_lsn == 0 => Err(corrupt("segment header names lsn 0".into())),
            _ => Ok(()),
        }
    }

    /// Whether damage at `at` may be cut; the reason to refuse otherwise.
    fn may_cut(
        &self,
        bytes: &[u8],
        at: u64,
        damage: &Damage,
        next_lsn: u64,
        newest: bool,
    ) -> Result<(), CutRefused> {
        let reason = damage.reason().to_string();
        if !newest {
            return Err(CutRefused::NotNewest { reason });
        }
        if self.shard.config.planted.cut_any_damage_in_newest_segment {
            return Ok(());
        }
        if let Damage::Invalid(_) = damage {
            return Err(CutRefused::NotTorn { reason });
        }
        if let Some(later) = wal::find_frame_after(bytes, at as usize, next_lsn) {
            return Err(CutRefused::IntactWriteFollows { reason, later });
        }
        let tail = bytes.len() as u64 - at;
        let write_max = self.write_bytes_max();
        if tail > write_max {
            return Err(CutRefused::LongerThanOneWrite {
                reason,
                tail,
                write_max,
            });
        }
        Ok(())
    }

    /// An unlisted segment newer than the manifest's newest: an incomplete creation if it holds
    /// no frame (the caller quarantines and removes it); a refusal if it holds one.
    pub fn handle_unlisted(
        &mut self,
        id: u64,
        file: &str,
        bytes: &[u8],
    ) -> Result<(), RecoverError> {
        if bytes.len() > wal::SEGMENT_HEADER_BYTES && SegmentHeader::decode(bytes).is_ok() {
            return Err(RecoverError::Manifest(format!(
                "{file} holds {} bytes after its header, but MANIFEST does not list it (records \
                 are written only to listed segments)",
                bytes.len() - wal::SEGMENT_HEADER_BYTES
            )));
        }
        if bytes.len() > wal::SEGMENT_HEADER_BYTES {
            return Err(RecoverError::Manifest(format!(
                "{file} is not in MANIFEST and is {} bytes, more than a segment header",
                bytes.len()
            )));
        }
        self.report.incomplete_segment = Some(id);
        Ok(())
    }

    /// The recovered shard, ready to serve (counts rebuilt, indexes built), and the report.
    pub fn finish(mut self, manifest: wal::Manifest) -> (Shard, RecoveryReport) {
        let s = &mut self.shard;
        s.replaying = false;
        s.durable_lsn = s.next_lsn - 1;
        s.building_first_lsn = s.next_lsn;
        s.manifest = manifest;
        if let Some(cut) = self.report.cut {
            if let Some(seg) = s.segments.iter_mut().find(|x| x.id == cut.segment) {
                seg.bytes = cut.offset;
            }
        }
        if let Some(seg) = s.segments.back() {
            s.durable_end = (seg.id, seg.bytes);
        }
        for m in s.meshes.values_mut() {
            m.recount();
            s.cache_bytes -= std::mem::take(&mut m.cache_released);
        }
        for (id, m) in &s.meshes {
            for (pos, msg) in &m.log {
                s.inbox_by_lsn.insert(msg.lsn, (id.clone(), *pos));
            }
        }
        for (ck, c) in &s.convs {
            if let Some(first) = c.first_lsn() {
                s.convs_by_lsn.insert((first, ck.clone()));
            }
            if c.head > 0 {
                *s.mesh_convs.entry(ck.0.clone()).or_default() += 1;
            }
        }
        (self.shard, self.report)
    }
}
