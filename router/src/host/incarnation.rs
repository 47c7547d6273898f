//! What a driver serves: one shard on its own ([`Core::Single`]), or one replica of the shard's
//! Raft group ([`Core::Replica`]). The driver's decisions (queues, writes, restarts, routing)
//! are the same for both; the replica adds ticks, messages to other replicas and log reads.

use super::Time;
use fabric_proto::internal::{Output, Request};
use fabric_shard::replica::Replica;
use fabric_shard::store::StoreError;
use fabric_shard::{ReadRequest, Shard, WalWrite};

/// One incarnation of a shard, as a driver serves it.
pub enum Core {
    Single(Box<Shard>),
    Replica(Box<Replica>),
}

impl Core {
    pub fn shard(&self) -> &Shard {
        match self {
            Core::Single(s) => s,
            Core::Replica(r) => r.shard(),
        }
    }

    pub fn shard_mut(&mut self) -> &mut Shard {
        match self {
            Core::Single(s) => s,
            Core::Replica(r) => r.shard_mut(),
        }
    }

    pub fn replica(&self) -> Option<&Replica> {
        match self {
            Core::Single(_) => None,
            Core::Replica(r) => Some(r),
        }
    }

    pub(crate) fn replica_mut(&mut self) -> Option<&mut Replica> {
        match self {
            Core::Single(_) => None,
            Core::Replica(r) => Some(r),
        }
    }

    /// A batch handed in now is taken whole (a replica that does not lead answers it at once).
    pub fn wants_input(&self) -> bool {
        match self {
            Core::Single(s) => s.wants_input(),
            Core::Replica(r) => r.takes_batch(),
        }
    }

    /// The shard stamps the wall clock into what it records; Raft's timers run on the
    /// monotonic one.
    pub fn handle_requests(&mut self, t: Time, batch: Vec<Request>) {
        match self {
            Core::Single(s) => s.handle_requests(t.unix_ms, batch),
            Core::Replica(r) => r.handle_requests(t.mono_ms, t.unix_ms, batch),
        }
    }

    pub fn poll_wal(&mut self, t: Time) -> Option<WalWrite> {
        match self {
            Core::Single(s) => s.poll_wal(),
            Core::Replica(r) => r.poll_wal(t.mono_ms),
        }
    }

    pub fn handle_wal_done(&mut self, t: Time, last_lsn: u64) {
        match self {
            Core::Single(s) => s.handle_wal_done(t.unix_ms, last_lsn),
            Core::Replica(r) => r.handle_wal_done(t.mono_ms, last_lsn),
        }
    }

    pub fn handle_wal_failed(&mut self, t: Time, no_space: bool, reason: &str) {
        match self {
            Core::Single(s) => s.handle_wal_failed(t.unix_ms, no_space, reason),
            Core::Replica(r) => r.handle_wal_failed(t.mono_ms, no_space, reason),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        match self {
            Core::Single(s) => s.poll_output(),
            Core::Replica(r) => r.poll_output(),
        }
    }

    pub fn poll_reads(&mut self) -> Option<ReadRequest> {
        self.shard_mut().poll_reads()
    }

    pub fn handle_read_done(&mut self, now: u64, id: u64, result: Result<Vec<u8>, StoreError>) {
        self.shard_mut().handle_read_done(now, id, result);
    }

    pub fn is_idle(&self) -> bool {
        match self {
            Core::Single(s) => s.is_idle(),
            Core::Replica(r) => r.is_idle(),
        }
    }

    /// A replica that must be recovered from disk (it lost its leadership with applied
    /// records that may never commit, or its log was replaced under its core).
    pub fn needs_restart(&self) -> bool {
        self.replica().is_some_and(|r| r.needs_restart())
    }
}
