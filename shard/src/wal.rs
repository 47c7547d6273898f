//! The WAL's on-disk format (format 4): segment files of write frames of records, and the
//! shard's `MANIFEST`. Pure functions over byte slices; the glue owns the files.
//!
//! ```text
//! segment  = segment_header | frame*
//! segment_header (36 bytes) = magic "FABRWAL2" | format:u32le | shard:u32le
//!                             | segment:u64le | first_lsn:u64le | crc:u32le
//! frame    = frame_header | record*            (one frame per group-commit write)
//! frame_header (28 bytes)   = magic FF FE 46 57 | len:u32le | first_lsn:u64le
//!                             | records:u32le | flags:u32le (0, or 1: rewind) | crc:u32le
//! record   = len:u32le | crc:u32le | type:u8 | lsn:u64le | term:u64le | payload[len]
//! crc      = crc32c of everything before it in the header; a record's crc covers
//!            type | lsn | term | payload
//! MANIFEST (68 bytes) = magic "FABRMANI" | format:u32le | shard:u32le | oldest:u64le
//!                       | newest:u64le | term:u64le | vote:u64le | commit:u64le
//!                       | base_term:u64le | crc:u32le  (oldest = newest = 0: no segment yet)
//! ```
//!
//! LSNs are dense across the whole shard (each record is the previous plus one), which lets
//! recovery tell a lost record from a reordered one. A record's term is the consensus term of
//! the leader that proposed it (0 for a record written without replication); terms never
//! decrease along the log, and recovery refuses a log where one does. Format 3 added the term
//! (and a `send`'s idempotency key to its record); format 4 added the replica's Raft hard
//! state to the manifest (`term` and `vote` together, a `commit` hint never above the durable
//! log, and `base_term`, the term of the entry just before the oldest segment's first record);
//! a data dir of an earlier format is refused by name. Segments are named by a number that
//! only grows (`00000000000000000001.wal`); a segment holds whole frames only.
//!
//! Why frames: a power loss can persist any subset of the pages of the write that was in
//! flight, so valid records may follow a hole inside that write; but it cannot damage a write
//! that completed its fdatasync. The frame header says where each write starts and ends, so
//! recovery can tell "damage inside the final write" (never synced, nothing acknowledged in
//! it: cut it, keeping the bytes in quarantine) from "damage in an earlier write" (synced and
//! acknowledged: refuse to start, naming file and offset). The frame magic holds the bytes
//! 0xFF and 0xFE, which never occur in UTF-8, so no message body can forge a frame header.

use crate::record::{Record, RecordType};

/// The WAL format this code writes and reads. A data dir of another format is refused.
pub const FORMAT: u32 = 4;
pub const SEGMENT_MAGIC: &[u8; 8] = b"FABRWAL2";
pub const MANIFEST_MAGIC: &[u8; 8] = b"FABRMANI";
pub const FRAME_MAGIC: [u8; 4] = [0xFF, 0xFE, b'F', b'W'];
pub const SEGMENT_HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 4;
pub const FRAME_HEADER_BYTES: usize = 4 + 4 + 8 + 4 + 4 + 4;
pub const MANIFEST_BYTES: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 8 + 4;
pub const RECORD_HEADER_BYTES: usize = 4 + 4 + 1 + 8 + 8;
/// A record's payload may be at most this long; a length field larger than this is
/// corruption, not a record. Bodies are far smaller (`frame_bytes_max` is capped below it) and
/// checkpoints are split into parts of `CHECKPOINT_PART_BYTES_MAX`.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The file name of a shard's manifest, and of the temp file it is written through.
pub const MANIFEST_FILE: &str = "MANIFEST";
pub const MANIFEST_TEMP_FILE: &str = "MANIFEST.tmp";
/// The directory (inside a shard's directory) that keeps bytes recovery cut off.
pub const QUARANTINE_DIR: &str = "quarantine";
const SEGMENT_SUFFIX: &str = ".wal";

pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}{SEGMENT_SUFFIX}")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The quarantine file name for bytes cut from `segment` at `offset`.
pub fn quarantine_file_name(segment: u64, offset: u64) -> String {
    format!("{segment:020}-{offset:012}.cut")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The header every segment file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub segment: u64,
    /// The LSN of the first record the segment holds (the next LSN when it was created).
    pub first_lsn: u64,
}

/// Why a segment header or manifest is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} bytes, shorter than a header")]
    Short(usize),
    #[error("no {what} magic: not a Fabric {what} (or written by a Fabric before WAL format 2)")]
    Magic { what: &'static str },
    #[error("header checksum mismatch")]
    Checksum,
    #[error("WAL format {0}; this node reads format {FORMAT} only")]
    Format(u32),
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if b.len() < SEGMENT_HEADER_BYTES {
            return Err(HeaderError::Short(b.len()));
        }
        if &b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic { what: "segment" });
        }
        if crc32c::crc32c(&b[..32]) != u32_at(b, 32) {
            return Err(HeaderError::Checksum);
        }
        let format = u32_at(b, 8);
        if format != FORMAT {
            return Err(HeaderError::Format(format));
        }
        Ok(SegmentHeader {
            shard: u32_at(b, 12),
            segment: u64_at(b, 16),
            first_lsn: u64_at(b, 24),
        })
    }
}

/// Which segments a shard holds: every id from `oldest` to `newest`, none missing. Written
/// (temp file, fsync, rename, directory fsync) after a new segment's header is durable and
/// before any record goes into it, before retired segments are unlinked, and whenever a
/// replica's term or vote changes: the manifest is also the Raft hard state, so term and vote
/// are persisted together, atomically, before any vote or append answer leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub shard: u32,
    /// 0 when the shard has no segment yet.
    pub oldest: u64,
    pub newest: u64,
    /// The Raft term this replica has seen (0 without replication).
    pub term: u64,
    /// The node this replica voted for in `term` (0: none).
    pub vote: u64,
    /// A commit index known when the manifest was written, never above the log durable then:
    /// recovery applies up to it and keeps the rest unapplied until a leader confirms it.
    pub commit: u64,
    /// The term of the entry at the oldest segment's first LSN minus one (0 if none): what log
    /// matching compares at the start of the retained log.
    pub base_term: u64,
}

impl Manifest {
    pub fn empty(shard: u32) -> Manifest {
        Manifest {
            shard,
            oldest: 0,
            newest: 0,
            term: 0,
            vote: 0,
            commit: 0,
            base_term: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.newest == 0
    }

    pub fn lists(&self, id: u64) -> bool {
        !self.is_empty() && (self.oldest..=self.newest).contains(&id)
    }

    pub fn encode(&self) -> [u8; MANIFEST_BYTES] {
        let mut b = [0u8; MANIFEST_BYTES];
        b[0..8].copy_from_slice(MANIFEST_MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        let fields = [
            self.oldest,
            self.newest,
            self.term,
            self.vote,
            self.commit,
            self.base_term,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let end = MANIFEST_BYTES - 4;
        let crc = crc32c::crc32c(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Manifest, HeaderError> {
        if b.len() >= 8 && &b[0..8] != MANIFEST_MAGIC {
            return Err(HeaderError::Magic { what: "manifest" });
        }
        if (12..MANIFEST_BYTES).contains(&b.len()) && u32_at(b, 8) < FORMAT {
            // An older manifest is shorter; its format field names it.
            return Err(HeaderError::Format(u32_at(b, 8)));
        }
        if b.len() < MANIFEST_BYTES {
            return Err(HeaderError::Short(b.len()));
        }
        let end = MANIFEST_BYTES - 4;
        if crc32c::crc32c(&b[..end]) != u32_at(b, end) {
            return Err(HeaderError::Checksum);
        }
        if u32_at(b, 8) != FORMAT {
            return Err(HeaderError::Format(u32_at(b, 8)));
        }
        Ok(Manifest {
            shard: u32_at(b, 12),
            oldest: u64_at(b, 16),
            newest: u64_at(b, 24),
            term: u64_at(b, 32),
            vote: u64_at(b, 40),
            commit: u64_at(b, 48),
            base_term: u64_at(b, 56),
        })
    }
}

/// A frame's `flags` bit: the frame rewinds the log. Its records replace every record from
/// its first LSN on (which must not be above the LSN expected next): a Raft follower cutting a
/// conflicting, uncommitted suffix appends the leader's entries this way instead of cutting
/// the file, so no byte it acknowledged is ever at risk. Recovery and reads treat records a
/// rewind replaced as absent; recovery refuses a rewind into data it applied.
pub const FRAME_FLAG_REWIND: u32 = 1;

/// A frame header as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of records after the header.
    pub len: u32,
    pub first_lsn: u64,
    pub records: u32,
    /// 0, or [`FRAME_FLAG_REWIND`].
    pub flags: u32,
}

impl FrameHeader {
    /// Fills the reserved header at the start of `frame` (whose records follow it).
    pub fn seal(frame: &mut [u8], first_lsn: u64, records: u32) {
        FrameHeader::seal_flags(frame, first_lsn, records, 0);
    }

    /// [`FrameHeader::seal`] with flags ([`FRAME_FLAG_REWIND`]).
    pub fn seal_flags(frame: &mut [u8], first_lsn: u64, records: u32, flags: u32) {
        debug_assert!(frame.len() >= FRAME_HEADER_BYTES);
        let len = (frame.len() - FRAME_HEADER_BYTES) as u32;
        frame[0..4].copy_from_slice(&FRAME_MAGIC);
        frame[4..8].copy_from_slice(&len.to_le_bytes());
        frame[8..16].copy_from_slice(&first_lsn.to_le_bytes());
        frame[16..20].copy_from_slice(&records.to_le_bytes());
        frame[20..24].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&frame[..24]);
        frame[24..28].copy_from_slice(&crc.to_le_bytes());
    }

    /// The header at the start of `b`, if whole and intact (and its flags known).
    pub fn decode(b: &[u8]) -> Option<FrameHeader> {
        if b.len() < FRAME_HEADER_BYTES || b[0..4] != FRAME_MAGIC {
            return None;
        }
        let flags = u32_at(b, 20);
        if crc32c::crc32c(&b[..24]) != u32_at(b, 24) || flags & !FRAME_FLAG_REWIND != 0 {
            return None;
        }
        Some(FrameHeader {
            len: u32_at(b, 4),
            first_lsn: u64_at(b, 8),
            records: u32_at(b, 16),
            flags,
        })
    }

    pub fn rewinds(&self) -> bool {
        self.flags & FRAME_FLAG_REWIND != 0
    }
}

/// Appends one framed record to `out`; returns the framed size in bytes, or `None` (with
/// `out` unchanged) if the payload is over [`RECORD_BYTES_MAX`]. The payload is encoded in
/// place after a reserved header, which is filled in last (length, then CRC).
pub fn encode_record(lsn: u64, term: u64, record: &Record, out: &mut Vec<u8>) -> Option<usize> {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    let kind = record.encode_into(out);
    finish_record(out, start, kind as u8, lsn, term)
}

/// Appends one framed record whose type byte and payload are already encoded (a replica's
/// entry from its leader, checked to decode before it is framed); as [`encode_record`].
pub fn encode_raw_record(
    lsn: u64,
    term: u64,
    kind: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<usize> {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    out.extend_from_slice(payload);
    finish_record(out, start, kind, lsn, term)
}

/// Fills the reserved header of the record at `start` (its payload follows to the end of
/// `out`): length, type, LSN, term, then the CRC over all but length and CRC.
fn finish_record(out: &mut Vec<u8>, start: usize, kind: u8, lsn: u64, term: u64) -> Option<usize> {
    let payload_len = out.len() - start - RECORD_HEADER_BYTES;
    if payload_len > RECORD_BYTES_MAX {
        out.truncate(start);
        return None;
    }
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 8] = kind;
    out[start + 9..start + 17].copy_from_slice(&lsn.to_le_bytes());
    out[start + 17..start + RECORD_HEADER_BYTES].copy_from_slice(&term.to_le_bytes());
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Some(out.len() - start)
}

/// How the bytes from some offset on fail to be a whole, valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// Damage a write torn by a power loss can leave: a missing, zeroed or partial header,
    /// a length past the end of the file, a record whose checksum or framing is wrong.
    Torn(String),
    /// Something no torn write leaves: a checksummed frame or record out of LSN sequence, a
    /// checksummed record that does not decode or has an unknown type. Never cut.
    Invalid(String),
}

impl Damage {
    pub fn reason(&self) -> &str {
        match self {
            Damage::Torn(r) | Damage::Invalid(r) => r,
        }
    }
}

#[derive(Debug)]
pub struct Scanned {
    pub lsn: u64,
    pub term: u64,
    /// Byte offset of the record in the segment file.
    pub offset: u64,
    /// Byte offset of the frame holding it.
    pub frame: u64,
    pub bytes: u64,
    pub record: Record,
}

/// The result of scanning one segment's frames.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<Scanned>,
    /// Bytes from the start of the file that hold the header and whole, valid frames.
    pub valid_len: u64,
    /// Where the first damaged frame starts, and what is wrong; `None` if the frames reach the
    /// end of the file exactly.
    pub damage: Option<(u64, Damage)>,
    /// Frames read whole.
    pub frames: u64,
    /// The lowest LSN a rewind frame of this segment rewound to: records of earlier segments
    /// from there on are replaced (this segment's own are dropped from `records` already).
    pub rewound_to: Option<u64>,
    /// Every rewind frame read whole: (the LSN it rewinds to, its offset).
    pub rewind_frames: Vec<(u64, u64)>,
}

/// Scans the frames of a segment whose header has been checked, from byte
/// [`SEGMENT_HEADER_BYTES`]. `expect_lsn` is the LSN the first record must have. `skip_crc`
/// exists only for the simulator's planted-bug mode (record checksums are not checked).
pub fn scan_frames(bytes: &[u8], expect_lsn: u64, skip_crc: bool) -> Scan {
    scan_frames_from(bytes, SEGMENT_HEADER_BYTES, expect_lsn, skip_crc)
}

/// Scans the frames of a segment from byte `at` (a frame boundary, at or after the header),
/// taking the LSN the first frame's intact header names as the expected one. For readers that
/// learn a segment write by write (the simulator's durability oracle).
pub fn scan_frames_at(bytes: &[u8], at: usize) -> Scan {
    let at = at.max(SEGMENT_HEADER_BYTES);
    let expect = bytes
        .get(at..)
        .and_then(FrameHeader::decode)
        .map_or(0, |h| h.first_lsn);
    scan_frames_from(bytes, at, expect, false)
}

fn scan_frames_from(bytes: &[u8], from: usize, mut expect_lsn: u64, skip_crc: bool) -> Scan {
    let mut records = Vec::new();
    let mut at = from.min(bytes.len());
    let mut frames = 0;
    let mut rewound_to: Option<u64> = None;
    let mut rewind_frames = Vec::new();
    let damage = loop {
        if at == bytes.len() {
            break None;
        }
        match scan_frame(bytes, at, expect_lsn, skip_crc, &mut records) {
            Ok((end, rewind)) => {
                frames += 1;
                if let Some(to) = rewind {
                    rewind_frames.push((to, at as u64));
                }
                if let Some(to) = rewind {
                    rewound_to = Some(rewound_to.map_or(to, |r| r.min(to)));
                }
                expect_lsn = records.last().map_or(expect_lsn, |r| r.lsn + 1);
                at = end;
            }
            Err(d) => break Some((at as u64, d)),
        }
    };
    Scan {
        records,
        valid_len: at as u64,
        damage,
        frames,
        rewound_to,
        rewind_frames,
    }
}

/// One frame at `at`: its records are appended to `out` only if the whole frame is valid (a
/// rewind frame first drops the records of `out` it replaces). Returns where the frame ends
/// and, for a rewind, the LSN it rewinds to.
fn scan_frame(
    bytes: &[u8],
    at: usize,
    expect_lsn: u64,
    skip_crc: bool,
    out: &mut Vec<Scanned>,
) -> Result<(usize, Option<u64>), Damage> {
    let rest = &bytes[at..];
    if rest.iter().all(|b| *b == 0) {
        return Err(Damage::Torn("zero bytes to the end of the file".into()));
    }
    let Some(h) = FrameHeader::decode(rest) else {
        return Err(Damage::Torn("no intact frame header".into()));
    };
    let end = FRAME_HEADER_BYTES + h.len as usize;
    if end > rest.len() {
        return Err(Damage::Torn(format!(
            "frame of {} bytes runs past the end of the file",
            h.len
        )));
    }
    check_frame_start(&h, expect_lsn)?;
    // The records a rewind replaces are the last ones of `out`; the term check starts from
    // the record just before the rewind.
    let kept = out.partition_point(|r| r.lsn < h.first_lsn);
    let mut prev = out[..kept].last().map_or(0, |r| r.term);
    // The count is checksummed but not trusted: a header naming 2^32 records must not
    // allocate for them (that aborts the process) before the records are found missing.
    let mut found =
        Vec::with_capacity((h.records as usize).min(h.len as usize / RECORD_HEADER_BYTES));
    let mut p = FRAME_HEADER_BYTES;
    let mut lsn = h.first_lsn;
    while p < end {
        let r = scan_record(&rest[p..end], lsn, skip_crc)?;
        if r.2 < prev {
            return Err(Damage::Invalid(format!(
                "record lsn {lsn} has term {} after a record of term {prev} (terms never \
                 decrease along the log)",
                r.2
            )));
        }
        prev = r.2;
        found.push(Scanned {
            lsn,
            term: r.2,
            offset: (at + p) as u64,
            frame: at as u64,
            bytes: r.1 as u64,
            record: r.0,
        });
        p += r.1;
        lsn += 1;
    }
    if found.len() != h.records as usize {
        return Err(Damage::Torn(format!(
            "frame holds {} records where its header says {}",
            found.len(),
            h.records
        )));
    }
    let rewind = h.rewinds().then_some(h.first_lsn);
    if rewind.is_some() {
        out.truncate(kept);
    }
    out.extend(found);
    Ok((at + end, rewind))
}

/// A frame starts at the LSN expected next; a rewind frame (with records) at or below it.
fn check_frame_start(h: &FrameHeader, expect_lsn: u64) -> Result<(), Damage> {
    let ok = if h.rewinds() {
        h.first_lsn >= 1 && h.first_lsn <= expect_lsn && h.records > 0
    } else {
        h.first_lsn == expect_lsn
    };
    if ok {
        return Ok(());
    }
    let first = h.first_lsn;
    Err(Damage::Invalid(if h.rewinds() {
        format!("an empty rewind frame, or one to lsn {first} past the expected {expect_lsn}")
    } else {
        format!("frame starts at lsn {first} where {expect_lsn} was expected")
    }))
}

/// One record at the start of `b` (which ends where its frame ends): the record, its size and
/// its term.
fn scan_record(b: &[u8], lsn: u64, skip_crc: bool) -> Result<(Record, usize, u64), Damage> {
    if b.len() < RECORD_HEADER_BYTES {
        return Err(Damage::Torn(
            "a record header crosses the frame's end".into(),
        ));
    }
    let len = u32_at(b, 0) as usize;
    if len > RECORD_BYTES_MAX || RECORD_HEADER_BYTES + len > b.len() {
        return Err(Damage::Torn(format!(
            "record length {len} does not fit its frame"
        )));
    }
    let size = RECORD_HEADER_BYTES + len;
    let (head, payload) = check_record(&b[..size], !skip_crc)?;
    if head.lsn != lsn {
        return Err(Damage::Invalid(format!(
            "record lsn {} where {lsn} was expected",
            head.lsn
        )));
    }
    match Record::decode(head.kind, payload) {
        Ok(r) => Ok((r, size, head.term)),
        Err(e) => Err(Damage::Invalid(format!("payload does not decode: {e}"))),
    }
}

/// The framed size of the record starting `b` (header and payload), once its header is
/// there; whether it is all there is the caller's question. For readers that start at a
/// record boundary (the shard's disk reads).
pub fn record_size(b: &[u8]) -> Option<usize> {
    (b.len() >= RECORD_HEADER_BYTES).then(|| RECORD_HEADER_BYTES + u32_at(b, 0) as usize)
}

/// A record header's fields, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHead {
    pub lsn: u64,
    pub term: u64,
    pub kind: RecordType,
}

/// One whole record (`b` is exactly its framed bytes), checked but not decoded: its header
/// fields and payload (length, checksum, type: the checks recovery's scan makes too, through
/// this function). `check_crc` false exists only for the simulator's planted-bug mode.
pub fn check_record(b: &[u8], check_crc: bool) -> Result<(RecordHead, &[u8]), Damage> {
    if b.len() < RECORD_HEADER_BYTES {
        return Err(Damage::Torn("a record header is cut short".into()));
    }
    let len = u32_at(b, 0) as usize;
    if len > RECORD_BYTES_MAX || RECORD_HEADER_BYTES + len != b.len() {
        return Err(Damage::Torn(format!(
            "record length {len} does not fit its bytes"
        )));
    }
    if check_crc && crc32c::crc32c(&b[8..]) != u32_at(b, 4) {
        return Err(Damage::Torn("record checksum mismatch".into()));
    }
    let Some(kind) = RecordType::from_u8(b[8]) else {
        return Err(Damage::Invalid(format!("unknown record type {}", b[8])));
    };
    let head = RecordHead {
        lsn: u64_at(b, 9),
        term: u64_at(b, 17),
        kind,
    };
    Ok((head, &b[RECORD_HEADER_BYTES..]))
}

/// The offset of the first intact frame header in `bytes[from..]` whose first LSN is at least
/// `lsn_min`: proof that a write followed the damage at `from`.
pub fn find_frame_after(bytes: &[u8], from: usize, lsn_min: u64) -> Option<usize> {
    let mut at = from + 1;
    while at + FRAME_HEADER_BYTES <= bytes.len() {
        let rest = &bytes[at..];
        let hit = rest.windows(4).position(|w| w == FRAME_MAGIC)?;
        at += hit;
        if let Some(h) = FrameHeader::decode(&bytes[at..]) {
            if h.first_lsn >= lsn_min || h.rewinds() {
                return Some(at);
            }
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests;
