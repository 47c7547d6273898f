//! The WAL's on-disk format: segment files of framed records. Pure functions over byte slices;
//! the glue owns the files.
//!
//! ```text
//! record = len:u32le | crc:u32le | type:u8 | lsn:u64le | payload[len]
//! crc    = crc32c(type | lsn | payload)
//! ```
//!
//! LSNs are dense across the whole shard (each record is the previous plus one), which lets
//! recovery tell a lost record from a reordered one. Segments are named by a number that only
//! grows (`00000000000000000001.wal`); a segment holds whole records only.
//!
//! Scanning stops at the first frame that is not a whole, valid record. Whether that is a torn
//! tail (truncate and go on) or corruption (refuse to start) is the caller's call: only the last
//! segment may end in a torn record.

use crate::record::{Record, RecordType};

pub const RECORD_HEADER_BYTES: usize = 4 + 4 + 1 + 8;
/// A length field larger than this is corruption, not a record.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;
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

/// Appends one framed record to `out`; returns the framed size in bytes. The payload is
/// encoded in place after a reserved header, which is filled in last (length, then CRC).
pub fn encode_record(lsn: u64, record: &Record, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    let kind = record.encode_into(out);
    let payload_len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(
        payload_len <= RECORD_BYTES_MAX,
        "record over RECORD_BYTES_MAX"
    );
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 8] = kind as u8;
    out[start + 9..start + RECORD_HEADER_BYTES].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Why a scan stopped before the end of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Fewer bytes left than a header, or than the header's length says: a torn write.
    Torn,
    /// Zero bytes to the end: preallocated or never written.
    ZeroTail,
    /// A whole frame whose checksum (or length field) is wrong: a torn or damaged write.
    Corrupt(String),
    /// A frame whose checksum is right but whose content is wrong (LSN out of sequence, unknown
    /// type, undecodable payload). No torn write looks like this: it is never cut as a tail.
    Invalid(String),
}

#[derive(Debug)]
pub struct Scanned {
    pub lsn: u64,
    pub offset: u64,
    pub bytes: u64,
    pub record: Record,
}

/// The result of scanning one segment.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<Scanned>,
    /// Bytes from the start that hold whole valid records.
    pub valid_len: u64,
    /// `None` if the scan reached the end exactly.
    pub stop: Option<StopReason>,
}

/// Scans a segment's bytes. `expect_lsn`, when known, is the LSN the first record must have.
/// `skip_crc` exists only for the simulator's planted-bug mode.
pub fn scan_segment(bytes: &[u8], mut expect_lsn: Option<u64>, skip_crc: bool) -> Scan {
    let mut records = Vec::new();
    let mut at = 0usize;
    let stop = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.iter().all(|b| *b == 0) {
            break Some(StopReason::ZeroTail);
        }
        if rest.len() < RECORD_HEADER_BYTES {
            break Some(StopReason::Torn);
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if len > RECORD_BYTES_MAX {
            break Some(StopReason::Corrupt(format!(
                "length {len} over the record limit {RECORD_BYTES_MAX}"
            )));
        }
        if rest.len() < RECORD_HEADER_BYTES + len {
            break Some(StopReason::Torn);
        }
        let frame = &rest[..RECORD_HEADER_BYTES + len];
        if !skip_crc && crc32c::crc32c(&frame[8..]) != crc {
            break Some(StopReason::Corrupt("checksum mismatch".into()));
        }
        let lsn = u64::from_le_bytes(frame[9..17].try_into().unwrap_or_default());
        if let Some(expect) = expect_lsn {
            if lsn != expect {
                break Some(StopReason::Invalid(format!(
                    "lsn {lsn} where {expect} was expected"
                )));
            }
        }
        let Some(kind) = RecordType::from_u8(frame[8]) else {
            break Some(StopReason::Invalid(format!(
                "unknown record type {}",
                frame[8]
            )));
        };
        let record = match Record::decode(kind, &frame[RECORD_HEADER_BYTES..]) {
            Ok(r) => r,
            Err(e) => break Some(StopReason::Invalid(format!("payload does not decode: {e}"))),
        };
        records.push(Scanned {
            lsn,
            offset: at as u64,
            bytes: frame.len() as u64,
            record,
        });
        expect_lsn = Some(lsn + 1);
        at += frame.len();
    };
    Scan {
        records,
        valid_len: at as u64,
        stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{AckedRec, MeshRec};

    fn sample(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for lsn in 1..=n {
            encode_record(
                lsn,
                &Record::Acked(AckedRec {
                    mesh: "m".into(),
                    peer: "p".into(),
                    upto: lsn,
                }),
                &mut out,
            );
            ends.push(out.len());
        }
        encode_record(
            n + 1,
            &Record::MeshCreated(MeshRec { mesh: "x".into() }),
            &mut out,
        );
        ends.push(out.len());
        (out, ends)
    }

    #[test]
    fn whole_segment_scans_to_the_end() {
        // Proves framed records scan back in order with dense LSNs and no stop reason.
        let (bytes, _) = sample(5);
        let scan = scan_segment(&bytes, Some(1), false);
        assert_eq!(scan.records.len(), 6);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert!(scan.stop.is_none());
        assert_eq!(scan.records[5].lsn, 6);
    }

    #[test]
    fn every_truncation_point_is_a_torn_tail_that_keeps_earlier_records() {
        // Proves cutting a segment anywhere keeps exactly the records before the cut.
        let (bytes, ends) = sample(4);
        for cut in 0..bytes.len() {
            let scan = scan_segment(&bytes[..cut], None, false);
            let whole = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(scan.records.len(), whole, "cut at {cut}");
            assert_eq!(
                scan.valid_len as usize,
                if whole == 0 { 0 } else { ends[whole - 1] }
            );
            if scan.valid_len as usize != cut {
                assert_eq!(scan.stop, Some(StopReason::Torn), "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_corruption_at_its_record() {
        // Proves any single bit flip inside a record stops the scan at that record's offset.
        let (bytes, ends) = sample(3);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let scan = scan_segment(&bad, Some(1), false);
            let record = ends.iter().position(|e| i < *e).unwrap();
            assert_eq!(scan.records.len(), record, "flip at {i}");
            assert!(scan.stop.is_some(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn lsn_gaps_are_corruption_and_zero_tails_are_clean() {
        // Proves a record with an unexpected LSN is refused and zero padding ends a scan cleanly.
        let (bytes, _) = sample(2);
        let scan = scan_segment(&bytes, Some(7), false);
        assert!(matches!(scan.stop, Some(StopReason::Invalid(_))));
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 100]);
        let scan = scan_segment(&padded, Some(1), false);
        assert_eq!(scan.stop, Some(StopReason::ZeroTail));
        assert_eq!(scan.valid_len as usize, bytes.len());
    }

    #[test]
    fn segment_names_round_trip() {
        // Proves segment file names sort numerically and parse back.
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert!(segment_file_name(9) < segment_file_name(10));
        assert_eq!(parse_segment_file_name("42.wal"), None);
        assert_eq!(parse_segment_file_name("00000000000000000042.tmp"), None);
    }
}
