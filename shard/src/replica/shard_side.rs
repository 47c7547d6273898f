//! What the shard core does for its replica: frame a follower's records as received, start a
//! rewind frame, and fail what waits for an `ok` when a leader is deposed.

use crate::{wal, Shard};
use fabric_proto::internal::Reply;
use fabric_proto::{ErrorCode, ProtoError, ServerOp};

impl Shard {
    /// Frames a record received from the leader (type byte and payload checked to decode),
    /// at `lsn`, which must be the next one.
    pub(crate) fn log_raw(&mut self, lsn: u64, term: u64, kind: u8, payload: &[u8]) {
        assert_eq!(lsn, self.next_lsn, "a follower frames entries in order");
        self.frame_next_record();
        let rel = self.framed_at as u64;
        let framed = wal::encode_raw_record(lsn, term, kind, payload, &mut self.building)
            .expect("an entry's payload was checked against the record limit");
        self.building_dirty.raw.push((lsn, rel));
        self.term = term;
        self.next_lsn += 1;
        self.building_records += 1;
        self.stats.records_written += 1;
        self.stats.bytes_written += framed as u64;
    }

    /// The next frame rewinds the log to `lsn`: its records replace every record from `lsn`
    /// on. Called with nothing building (a follower frames only between writes).
    pub(crate) fn start_rewind(&mut self, lsn: u64) {
        assert!(
            self.building_records == 0 && self.sealed.is_empty() && self.inflight.is_none(),
            "a rewind starts a frame of its own"
        );
        assert!(
            lsn >= 1 && lsn <= self.next_lsn,
            "a rewind goes back, never forward"
        );
        self.next_lsn = lsn;
        self.building_first_lsn = lsn;
        self.building_flags = wal::FRAME_FLAG_REWIND;
    }

    /// A deposed leader: everything waiting for its `ok` is answered `unavailable` (it may
    /// still commit under the next leader: the client retries with its idempotency key), and
    /// the shard takes nothing more until it is recovered from disk.
    pub(crate) fn fail_pending(&mut self, reason: &str) {
        self.failed = true;
        for (_, o) in std::mem::take(&mut self.pending) {
            let r = match &o.reply {
                Reply::Frame(ServerOp::Ok { r, .. }) => Some(*r),
                _ => None,
            };
            self.stats.errors_sent += 1;
            let e = ProtoError::new(ErrorCode::Unavailable, reason.to_string());
            self.emit(o.session, Reply::Frame(ServerOp::error(r, e)));
        }
    }
}
