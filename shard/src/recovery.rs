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
//! - A replica of a group of 3 or 5 ([`Recoverer::repairable`]) does not refuse damage of the
//!   kind a bit flip leaves (a checksum, a frame or a segment header, anywhere but the oldest
//!   segment's header): it cuts the log at the damaged frame, keeping every cut byte in
//!   quarantine, and starts in repair ([`crate::repair`]). Damage that checksums pass (terms
//!   going back, a segment out of LSN sequence) still refuses: no bit flip makes it.
//! - A segment newer than the manifest lists is an incomplete creation (its header is written
//!   before the manifest lists it, and records only after): if it holds no frame it is
//!   quarantined and removed; if it holds one, recovery refuses.

use crate::raft::{ConfChange, TermRun};
use crate::record::Record;
use crate::repair;
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
    /// Damage a replica cuts to repair from its leader (see [`crate::repair`]).
    pub repair: Option<RepairCut>,
    /// The replica starts in repair: it must hold entries through this LSN before it votes.
    pub repair_through: Option<u64>,
    /// A repair marker was found whose range the log holds again: the repair is over and the
    /// marker was removed.
    pub repair_finished: bool,
}

/// Damage in a replica's log that no torn write explains, cut so the replica can fetch the
/// range from its leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairCut {
    /// The damaged segment: it keeps `[0, offset)`; offset 0 (its header is damaged) removes it.
    pub segment: u64,
    pub offset: u64,
    /// The first LSN cut, and the highest LSN the cut bytes name.
    pub from_lsn: u64,
    pub through_lsn: u64,
    /// Later segments, cut whole.
    pub removed: Vec<u64>,
    /// What was wrong, for the log line.
    pub reason: String,
}

/// A record recovery read but did not apply: a replica applies only what is committed (up to
/// the manifest's commit hint, in whole frames), and keeps the rest for when a leader confirms
/// it (or replaces it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord {
    pub lsn: u64,
    pub term: u64,
    /// (segment, frame offset, record offset).
    pub at: (u64, u64, u64),
    pub record: Record,
}

/// What a replica's Raft core needs from its recovered log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredLog {
    /// The terms of the live log (records a rewind replaced are gone), one run per term.
    pub term_runs: Vec<TermRun>,
    /// Membership changes in the live log, by LSN.
    pub conf: Vec<(u64, ConfChange)>,
    /// Records not applied, oldest first.
    pub tail: Vec<TailRecord>,
    /// The last LSN applied.
    pub applied: u64,
    /// Set when the replica starts in repair: it may not vote or lead until entries through
    /// this LSN are durable in its log ([`crate::raft::RaftCore::begin_repair`]).
    pub repair_through: Option<u64>,
    /// The membership committed at an index (`MEMBERS`, [`crate::members`]): conf entries
    /// at or below it are in it already.
    pub members: Option<crate::members::MembersFile>,
}

/// Rebuilds a shard from its listed segments, oldest first. Pure: [`crate::store::recover`]
/// reads the files and carries out the cuts it reports.
pub struct Recoverer {
    shard: Shard,
    expect_lsn: Option<u64>,
    last_segment: Option<u64>,
    report: RecoveryReport,
    /// Whole frames up to this LSN are applied; later ones go to `log.tail`.
    apply_through: u64,
    /// Records read but not yet applied: a rewind frame in a later segment may still replace
    /// them. A record is applied once `window` records follow it (a rewind replaces only an
    /// uncommitted suffix, which the leader bounds), or at the end of recovery.
    pending: std::collections::VecDeque<TailRecord>,
    window: usize,
    log: RecoveredLog,
    /// Damage of the kind a bit flip leaves is cut for repair, not refused.
    repairable: bool,
}

impl Recoverer {
    /// Recovery of a shard without replication: every record is applied.
    pub fn new(config: ShardConfig) -> Recoverer {
        Recoverer::replica(config, u64::MAX, 0)
    }

    /// Recovery of a replica: whole frames up to `apply_through` (the manifest's commit hint)
    /// are applied, the rest kept unapplied ([`RecoveredLog::tail`]); `window` is how far back
    /// a rewind may reach (the most uncommitted entries a leader has).
    pub fn replica(config: ShardConfig, apply_through: u64, window: usize) -> Recoverer {
        Recoverer {
            shard: Shard::replaying(config),
            expect_lsn: None,
            last_segment: None,
            report: RecoveryReport::default(),
            apply_through,
            pending: std::collections::VecDeque::new(),
            window,
            log: RecoveredLog::default(),
            repairable: false,
        }
    }

    /// Cut damage a bit flip can leave for repair instead of refusing it (a replica of a
    /// group with other voters to fetch from).
    pub fn repairable(mut self) -> Recoverer {
        self.repairable = true;
        self
    }

    /// Whether a cut for repair was decided.
    pub fn repairing(&self) -> bool {
        self.report.repair.is_some()
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
        if let Some(cut) = &mut self.report.repair {
            // Past the damage: the whole segment is cut, and what it names may be acknowledged.
            cut.removed.push(id);
            cut.through_lsn = repair::acked_bound_of_segment(bytes, cut.through_lsn);
            return Ok(());
        }
        let header = match SegmentHeader::decode(bytes) {
            Ok(h) => h,
            Err(e) => {
                let reason = format!("segment header: {e}");
                let Some(from_lsn) = self.expect_lsn.filter(|_| self.repairable) else {
                    return Err(corrupt(0, reason));
                };
                self.start_repair(id, 0, bytes, from_lsn, reason);
                return Ok(());
            }
        };
        // A segment a rewind started begins below the LSN expected next (its first frame is
        // that rewind, from the header's LSN).
        let rewind_start = wal::FrameHeader::decode(&bytes[wal::SEGMENT_HEADER_BYTES..])
            .is_some_and(|f| f.rewinds() && f.first_lsn == header.first_lsn);
        self.check_header(&header, id, file, rewind_start)?;
        let expect = self.expect_lsn.unwrap_or(header.first_lsn);
        let skip_crc = self.shard.config.planted.skip_crc_on_recovery;
        let scan = wal::scan_frames(bytes, expect, skip_crc);
        if let Some((at, damage)) = &scan.damage {
            let next = scan.records.last().map_or(expect, |r| r.lsn + 1);
            self.handle_damage(id, bytes, (*at, damage), next, newest)
                .map_err(|refused| corrupt(*at, refused.to_string()))?;
        }
        if let Some(to) = scan.rewound_to {
            let at = wal::SEGMENT_HEADER_BYTES as u64;
            self.rewind(to).map_err(|reason| corrupt(at, reason))?;
        }
        for (lsn, offset) in &scan.rewind_frames {
            self.shard.rewinds.push((*lsn, (id, *offset)));
        }
        let first_lsn = header.first_lsn;
        let last_lsn = scan.records.last().map_or(first_lsn - 1, |r| r.lsn);
        for rec in scan.records {
            self.take_record(id, rec)
                .map_err(|(offset, reason)| corrupt(offset, reason))?;
        }
        self.apply_pending(self.window);
        self.shard.term = self.log.term_runs.last().map_or(0, |r| r.term);
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

    /// Damage at `at` of segment `id`, the log going on from `next`: cut as a torn final
    /// write, cut for repair (a replica with other voters), or refused (the reason).
    fn handle_damage(
        &mut self,
        id: u64,
        bytes: &[u8],
        (at, damage): (u64, &Damage),
        next: u64,
        newest: bool,
    ) -> Result<(), CutRefused> {
        match self.may_cut(bytes, at, damage, next, newest) {
            Ok(()) => {
                self.report.cut = Some(Cut {
                    segment: id,
                    offset: at,
                    bytes: bytes.len() as u64 - at,
                });
                self.report.cut_reason = Some(damage.reason().to_string());
                Ok(())
            }
            Err(refused) if self.repairable => {
                self.start_repair(id, at, bytes, next, refused.to_string());
                Ok(())
            }
            Err(refused) => Err(refused),
        }
    }

    /// Decides a cut for repair at `offset` of segment `id` (0: the whole segment), the log
    /// going on from `from_lsn`; every LSN the cut bytes name may have been acknowledged.
    fn start_repair(&mut self, id: u64, offset: u64, bytes: &[u8], from_lsn: u64, reason: String) {
        // The cut bytes may hold rewind frames that replaced entries of the kept log, which the
        // commit hint may cover: only entries a rewind cannot reach (`window` below the kept
        // log's end) stay committed; the rest wait, unapplied, for a leader's append to confirm
        // or replace them. Records pending are exactly that last `window`: none was applied.
        let reach = (from_lsn - 1).saturating_sub(self.window as u64);
        self.apply_through = self.apply_through.min(reach);
        let through_lsn = if offset == 0 {
            repair::acked_bound_of_segment(bytes, from_lsn - 1)
        } else {
            repair::acked_bound(bytes, offset as usize, from_lsn - 1)
        };
        // At least one entry past the kept log: the cut bytes may hold a rewind whose entries
        // replaced part of the kept log, so the kept log counts as unverified until a leader's
        // append (log matching) extends it.
        self.report.repair = Some(RepairCut {
            segment: id,
            offset,
            from_lsn,
            through_lsn: through_lsn.max(from_lsn),
            removed: Vec::new(),
            reason,
        });
    }

    /// One live record: checked against the term before it, noted in the log's term runs and
    /// membership changes, and queued to be applied. An error is (offset, reason).
    fn take_record(&mut self, id: u64, rec: wal::Scanned) -> Result<(), (u64, String)> {
        let prev = self.log.term_runs.last().map_or(0, |r| r.term);
        if rec.term < prev {
            // The scan checks terms within a segment; this is the check across segments.
            let reason = format!(
                "record lsn {} has term {} after a record of term {prev} (terms never \
                 decrease along the log)",
                rec.lsn, rec.term
            );
            return Err((rec.offset, reason));
        }
        if rec.term > prev || self.log.term_runs.is_empty() {
            self.log.term_runs.push(TermRun {
                first_index: rec.lsn,
                term: rec.term,
            });
        }
        if let Record::ConfChange(cc) = &rec.record {
            self.log.conf.push((rec.lsn, *cc));
        }
        self.report.records += 1;
        self.pending.push_back(TailRecord {
            lsn: rec.lsn,
            term: rec.term,
            at: (id, rec.frame, rec.offset),
            record: rec.record,
        });
        Ok(())
    }

    /// Applies pending records, oldest first, while more than `keep` follow and they are at or
    /// below `apply_through` (with `keep` 0, at the end, every one that may be).
    fn apply_pending(&mut self, keep: usize) {
        while self.pending.len() > keep && self.pending[0].lsn <= self.apply_through {
            let rec = self.pending.pop_front().expect("a pending record");
            self.shard.replay_at = rec.at;
            self.log.applied = rec.lsn;
            self.shard.apply(rec.lsn, rec.record);
        }
    }

    /// A rewind frame replaced every record from `to` on, some of them in earlier segments:
    /// they must all be unapplied (only uncommitted records are ever replaced).
    fn rewind(&mut self, to: u64) -> Result<(), String> {
        if to <= self.log.applied {
            return Err(format!(
                "a rewind frame replaces the log from lsn {to}, but records up to lsn {} were \
                 committed and applied",
                self.log.applied
            ));
        }
        self.pending.retain(|r| r.lsn < to);
        let log = &mut self.log;
        log.conf.retain(|c| c.0 < to);
        log.term_runs.retain(|r| r.first_index < to);
        for seg in self.shard.segments.iter_mut() {
            seg.last_lsn = seg.last_lsn.min(to - 1).max(seg.first_lsn - 1);
        }
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

    fn check_header(
        &self,
        h: &SegmentHeader,
        id: u64,
        file: &str,
        rewind_start: bool,
    ) -> Result<(), RecoverError> {
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
            Some(expect) if h.first_lsn < expect && rewind_start => Ok(()),
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
    pub fn finish(self, manifest: wal::Manifest) -> (Shard, RecoveryReport) {
        let (mut shard, report, log) = self.finish_replica(manifest);
        debug_assert!(
            log.tail.is_empty(),
            "a shard without replication applies everything"
        );
        shard.end_replay();
        (shard, report)
    }

    /// A replica's recovered shard, still replaying (it applies committed records as a
    /// follower until it leads: [`Shard::end_replay`]), the report, and its log for Raft.
    pub fn finish_replica(
        mut self,
        manifest: wal::Manifest,
    ) -> (Shard, RecoveryReport, RecoveredLog) {
        self.apply_pending(0);
        self.log.tail = self.pending.drain(..).collect();
        let s = &mut self.shard;
        s.durable_lsn = s.next_lsn - 1;
        s.building_first_lsn = s.next_lsn;
        s.manifest = manifest;
        if let Some(cut) = self.report.cut {
            if let Some(seg) = s.segments.iter_mut().find(|x| x.id == cut.segment) {
                seg.bytes = cut.offset;
            }
        }
        if let Some(cut) = &self.report.repair {
            if let Some(seg) = s.segments.iter_mut().find(|x| x.id == cut.segment) {
                seg.bytes = cut.offset;
            }
            // The manifest recovery writes before it cuts: the damaged segment (or the one
            // before it) is the newest, and no commit is known past the cut.
            s.manifest.newest = s.segments.back().map_or(0, |x| x.id);
            s.manifest.commit = s.manifest.commit.min(self.apply_through);
        }
        if let Some(seg) = s.segments.back() {
            s.durable_end = (seg.id, seg.bytes);
        }
        (self.shard, self.report, self.log)
    }
}

impl Shard {
    /// Ends replay: rebuilds the counts and indexes the live path keeps up as it goes (after
    /// recovery, or when a follower replica starts to lead).
    pub(crate) fn end_replay(&mut self) {
        let s = self;
        s.replaying = false;
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
    }
}
