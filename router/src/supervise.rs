//! What a host does when a shard's storage fails: the restart policy, sans-IO, shared by the
//! node (`fabric/src/shard_actor.rs`) and the simulator, so the simulator checks the policy
//! the node runs.
//!
//! - A failed write whose bytes were cut back is recovered from disk after a backoff that
//!   doubles with each failure (`restart_backoff_ms_min` up to `restart_backoff_ms_max`), and
//!   the count starts over after `restart_healthy_ms` without a failure: a crash loop slows
//!   down, a rare failure costs a short pause.
//! - A full disk (ENOSPC) is not an outage: the shard is recovered at once and serves reads,
//!   refusing writes with `storage_full` until the backoff has passed; the next write then
//!   tries again, so the shard recovers by itself when space returns.
//! - A failure the host could not clean up (the cut-back after a failed sync failed too) keeps
//!   the shard down: its page cache cannot be trusted, and an operator must look.

/// The policy's limits, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub restart_backoff_ms_min: u64,
    pub restart_backoff_ms_max: u64,
    pub restart_healthy_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            restart_backoff_ms_min: 10,
            restart_backoff_ms_max: 30_000,
            restart_healthy_ms: 60_000,
        }
    }
}

/// Why a shard incarnation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFailure {
    /// A write failed for lack of space; its bytes were cut back.
    NoSpace,
    /// A write failed otherwise (EIO, ...); its bytes were cut back.
    Storage,
    /// The shard's loop panicked or ended unexpectedly.
    Crashed,
    /// A write failed and cutting it back failed too.
    Unrecoverable,
}

/// What the host does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Recover now, refusing writes with `storage_full` until `writes_from_ms`.
    RecoverRefusingWrites { writes_from_ms: u64 },
    /// Recover at `at_ms`; until then requests are answered `unavailable`.
    RestartAt { at_ms: u64 },
    /// Stay down; requests are answered `unavailable`.
    StayDown,
}

/// One shard's failure history.
#[derive(Debug, Clone)]
pub struct Supervision {
    policy: RestartPolicy,
    /// Failures in a row (none `restart_healthy_ms` apart).
    failures: u32,
    last_failure_ms: Option<u64>,
}

impl Supervision {
    pub fn new(policy: RestartPolicy) -> Supervision {
        Supervision {
            policy,
            failures: 0,
            last_failure_ms: None,
        }
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A shard incarnation ended at `now` (ms, the host's monotonic clock).
    pub fn handle_failure(&mut self, now: u64, failure: ShardFailure) -> Decision {
        if self
            .last_failure_ms
            .is_some_and(|t| now.saturating_sub(t) >= self.policy.restart_healthy_ms)
        {
            self.failures = 0;
        }
        self.last_failure_ms = Some(now);
        let delay = self.backoff_ms();
        self.failures = self.failures.saturating_add(1);
        match failure {
            ShardFailure::NoSpace => Decision::RecoverRefusingWrites {
                writes_from_ms: now + delay,
            },
            ShardFailure::Storage | ShardFailure::Crashed => {
                Decision::RestartAt { at_ms: now + delay }
            }
            ShardFailure::Unrecoverable => Decision::StayDown,
        }
    }

    /// The wait for the next failure in a row: the minimum, doubled per failure, capped.
    fn backoff_ms(&self) -> u64 {
        let p = &self.policy;
        let doubled = p
            .restart_backoff_ms_min
            .checked_shl(self.failures.min(40))
            .unwrap_or(u64::MAX);
        doubled.min(p.restart_backoff_ms_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_healthy_period() {
        // Proves the restart delay grows 10, 20, 40 ms ... up to the cap for failures in a
        // row, and starts over once the shard ran restart_healthy_ms without a failure.
        let mut s = Supervision::new(RestartPolicy::default());
        let mut now = 1_000;
        let mut delays = Vec::new();
        for _ in 0..14 {
            match s.handle_failure(now, ShardFailure::Storage) {
                Decision::RestartAt { at_ms } => delays.push(at_ms - now),
                d => panic!("{d:?}"),
            }
            now += 1;
        }
        assert_eq!(&delays[..4], &[10, 20, 40, 80]);
        assert_eq!(*delays.last().unwrap(), 30_000, "capped");
        now += 60_000;
        assert_eq!(
            s.handle_failure(now, ShardFailure::Storage),
            Decision::RestartAt { at_ms: now + 10 },
            "reset after a healthy minute"
        );
    }

    #[test]
    fn a_full_disk_keeps_serving_reads_and_an_unclean_failure_stays_down() {
        // Proves ENOSPC recovers at once with writes refused for the backoff, and a failure
        // whose bytes could not be cut back never restarts.
        let mut s = Supervision::new(RestartPolicy::default());
        assert_eq!(
            s.handle_failure(5, ShardFailure::NoSpace),
            Decision::RecoverRefusingWrites { writes_from_ms: 15 }
        );
        assert_eq!(
            s.handle_failure(20, ShardFailure::NoSpace),
            Decision::RecoverRefusingWrites { writes_from_ms: 40 }
        );
        assert_eq!(
            s.handle_failure(30, ShardFailure::Unrecoverable),
            Decision::StayDown
        );
    }
}
