//! One source of a node's limits: [`Limits`] holds every numeric limit, its default, its
//! allowed range and the relations between limits ([`Limits::validate`]); the node's
//! configuration (`fabric::config::Config`), the core configs ([`Limits::shard_config`],
//! [`Limits::session_config`], [`Limits::restart_policy`], [`Limits::router`]) and the
//! simulator's drawn options all derive from it, so no other place restates a default or a
//! rule.
//!
//! Names are the node's configuration keys (unit last): the TOML key `frame_bytes_max`, the
//! flag `--frame-bytes-max` and the variable `FABRIC_FRAME_BYTES_MAX` all name
//! `Limits::frame_bytes_max`.

use crate::host::{session_replies_owed_max, session_reply_queue_batches_min};
use crate::supervise::RestartPolicy;
use crate::{Router, RouterError, PARTITIONS_MAX};
use fabric_edge::{SessionConfig, BODY_FRAMING_BYTES};
use fabric_shard::ShardConfig;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest `frame_bytes_max`: a body (at most a frame) must fit in one WAL record
/// (`fabric_shard::wal::RECORD_BYTES_MAX`, 16 MiB) with its ids and headers, with room to spare.
pub const FRAME_BYTES_MAX_LIMIT: usize = 8 << 20;
const _: () = assert!(FRAME_BYTES_MAX_LIMIT < fabric_shard::wal::RECORD_BYTES_MAX);
/// Smallest `frame_bytes_max`: the largest body is then 1 KiB ([`BODY_FRAMING_BYTES`] less).
pub const FRAME_BYTES_MAX_FLOOR: usize = 2048;
/// Most reply batches a session's reply channel may hold: a bound on the memory one stuck
/// session can pin, and on the sum of in-flight requests and every shard's push credit.
pub const SESSION_REPLY_QUEUE_LIMIT: usize = 1 << 26;
/// Frames waiting for a client that does not read, past which its session closes as
/// `overloaded`, unless in-flight answers plus every shard's push credit need more.
pub const PENDING_TRANSMIT_FRAMES_FLOOR: usize = 65_536;
/// Most shards a node may have.
pub const SHARDS_MAX: u32 = 1024;
/// Most shards the node's default (one per core) picks.
pub const SHARDS_DEFAULT_MAX: u32 = 64;

/// The values a limit may take: `min..=max`, and 0 too (meaning "off") if `zero_is_off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRange {
    pub min: u64,
    pub max: u64,
    pub zero_is_off: bool,
}

impl LimitRange {
    const fn at_least(min: u64) -> LimitRange {
        LimitRange::between(min, u64::MAX)
    }
    const fn between(min: u64, max: u64) -> LimitRange {
        LimitRange {
            min,
            max,
            zero_is_off: false,
        }
    }
    const fn off_or_at_least(min: u64) -> LimitRange {
        LimitRange {
            zero_is_off: true,
            ..LimitRange::at_least(min)
        }
    }

    pub fn contains(&self, v: u64) -> bool {
        (self.zero_is_off && v == 0) || (self.min..=self.max).contains(&v)
    }
}

/// As docs/OPERATIONS.md's range column writes it (a test holds the two equal).
impl fmt::Display for LimitRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.zero_is_off {
            f.write_str("0 (off) or ")?;
        }
        match self.max {
            u64::MAX => write!(f, "at least {}", self.min),
            max => write!(f, "{}..={max}", self.min),
        }
    }
}

/// One limit as a number: what `validate` checks and what the docs table lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitEntry {
    pub key: &'static str,
    pub value: u64,
    pub range: LimitRange,
}

/// Why a set of limits cannot run a node. Every message names the limits and their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("{key} {value} is out of range: it must be {range}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        range: LimitRange,
    },
    /// A relation between limits fails: `subject` and `other` each name limits with their
    /// values (`"partitions 2"`, `"shards 4"`), `relation` is `"below"` or `"above"`.
    #[error("{subject} is {relation} {other}: {why}")]
    Relation {
        subject: String,
        relation: &'static str,
        other: String,
        why: &'static str,
    },
}

/// Lossless widening of the limit types to the one type ranges are written in.
trait Widen {
    fn widen(self) -> u64;
}
impl Widen for u32 {
    fn widen(self) -> u64 {
        u64::from(self)
    }
}
impl Widen for u64 {
    fn widen(self) -> u64 {
        self
    }
}
impl Widen for usize {
    fn widen(self) -> u64 {
        // usize is at most 64 bits on every target Fabric builds for.
        self as u64
    }
}

/// Declares every limit once: its doc, key, type, default and range. The struct, its
/// `Default`, [`LIMIT_KEYS`] and [`Limits::entries`] all come from this one list.
macro_rules! limits {
    ($( $(#[doc = $doc:literal])* $key:ident : $ty:ty = $default:expr, $range:expr; )*) => {
        /// Every numeric limit of a node. Units are last in every name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Limits { $( $(#[doc = $doc])* pub $key: $ty, )* }

        impl Default for Limits {
            /// The embedded defaults (`shards` is 1 here; the node's default is one per core,
            /// [`Limits::shards_for_cores`]).
            fn default() -> Limits {
                Limits { $( $key: $default, )* }
            }
        }

        /// Every limit's key, in declaration order.
        pub const LIMIT_KEYS: &[&str] = &[$( stringify!($key) ),*];

        impl Limits {
            /// Every limit with its value and allowed range, in declaration order.
            pub fn entries(&self) -> Vec<LimitEntry> {
                vec![$( LimitEntry {
                    key: stringify!($key),
                    value: self.$key.widen(),
                    range: $range,
                }, )*]
            }

            /// Sets the limit called `key` to `value`; false (and nothing set) for an unknown
            /// key or a value its type cannot hold.
            pub fn set(&mut self, key: &str, value: u64) -> bool {
                match key {
                    $( stringify!($key) => match <$ty>::try_from(value) {
                        Ok(v) => {
                            self.$key = v;
                            true
                        }
                        Err(_) => false,
                    }, )*
                    _ => false,
                }
            }
        }
    };
}

limits! {
    /// Shard actors, each with its own WAL; fixed for the life of a data dir.
    shards: u32 = 1, LimitRange::between(1, SHARDS_MAX as u64);
    /// Partitions the router hashes keys into; fixed for the life of a data dir.
    partitions: u32 = 256, LimitRange::between(1, PARTITIONS_MAX as u64);
    /// Largest client frame or HTTP body accepted (and sent).
    frame_bytes_max: usize = fabric_proto::FRAME_BYTES_MAX_DEFAULT,
        LimitRange::between(FRAME_BYTES_MAX_FLOOR as u64, FRAME_BYTES_MAX_LIMIT as u64);
    /// Requests one session may have waiting for acknowledgement before the node stops
    /// reading it.
    inflight_requests_max: u32 = 1024, LimitRange::at_least(1);
    /// A new session must say hello within this time.
    hello_timeout_ms: u64 = 10_000, LimitRange::at_least(1);
    /// Rotate WAL segments at this size (the simulator runs segments of 1 KiB).
    wal_segment_bytes_max: u64 = 64 << 20, LimitRange::at_least(1024);
    /// Stop taking requests into a shard while its unwritten batch is this large; a write is
    /// cut at this size plus one record.
    wal_batch_bytes_max: usize = 4 << 20, LimitRange::at_least(1);
    /// Per-shard WAL size above which the oldest segments are deleted (unacked inbox data is
    /// kept).
    retention_bytes_max: u64 = 256 << 20, LimitRange::at_least(1);
    /// Request batches queued for one shard before senders wait.
    shard_queue_batches_max: usize = 1024, LimitRange::at_least(1);
    /// Frames a shard pushes to a session before the session reports them written.
    push_credit_frames_max: u32 = 1024, LimitRange::at_least(1);
    /// Log entries one drain of one session may look at before the shard turns to the next.
    drain_scan_entries_max: usize = 4096, LimitRange::at_least(1);
    /// Writes waiting for durability before a shard stops taking requests.
    pending_acks_max: usize = 65_536, LimitRange::at_least(1);
    /// Most server ops joined into one batch frame for a client that asked for batch frames.
    out_batch_ops_max: u32 = 256, LimitRange::between(1, fabric_proto::BATCH_OPS_MAX as u64);
    /// Body bytes of unacknowledged inbox messages one peer may hold.
    inbox_backlog_bytes_max: u64 = 64 << 20, LimitRange::at_least(1);
    /// The same for a whole mesh on one shard, each message counted once.
    mesh_inbox_backlog_bytes_max: u64 = 512 << 20, LimitRange::at_least(1);
    /// Conversations of one mesh one shard holds.
    mesh_conversations_max: u32 = 100_000, LimitRange::at_least(1);
    /// Longest wait before a shard whose storage failed is recovered (the wait doubles from
    /// 10 ms, so it is at least that).
    restart_backoff_ms_max: u64 = 30_000, LimitRange::at_least(10);
    /// A WAL write in flight longer than this makes `/readyz` fail for its shard.
    wal_sync_stall_ms_max: u64 = 10_000, LimitRange::at_least(1);
    /// An HTTP request's headers must be in within this time (also the keep-alive idle limit).
    http_header_timeout_ms: u64 = 10_000, LimitRange::at_least(1);
    /// An HTTP request's body must be in within this time.
    http_body_timeout_ms: u64 = 30_000, LimitRange::at_least(1);
    /// A TLS handshake on the HTTP port must finish within this time of the accept.
    tls_handshake_timeout_ms: u64 = 10_000, LimitRange::at_least(1);
    /// Client connections open at once, all transports together.
    connections_max: u32 = 65_536, LimitRange::at_least(1);
    /// Client connections open at once from one address (IPv6: one /64).
    connections_per_ip_max: u32 = 16_384, LimitRange::at_least(1);
    /// Conversations one session may be subscribed to at once (a shard counts them in a u32).
    session_subscriptions_max: usize = 1024, LimitRange::between(1, fabric_proto::internal::ATTACH_SUBS_MAX as u64);
    /// The node pings each WebSocket session this often (0: never).
    ping_interval_ms: u64 = 30_000, LimitRange::off_or_at_least(100);
    /// A session whose pong is this late is closed.
    pong_timeout_ms: u64 = 30_000, LimitRange::at_least(100);
    /// A session whose writes make no progress for this long is closed.
    write_timeout_ms: u64 = 30_000, LimitRange::at_least(100);
    /// A request (WebSocket, QUIC or HTTP) its shard has not answered within this time is
    /// answered `unavailable`: the shard has no quorum, or its leader cannot be reached.
    request_timeout_ms: u64 = 5_000, LimitRange::at_least(1);
    /// Frames a connection may send before its hello.
    prehello_frames_max: u32 = 16, LimitRange::at_least(1);
    /// Frames the node answers a connection before it is welcomed (at least `options` and
    /// `challenge`).
    prehello_answers_max: u32 = 64, LimitRange::at_least(2);
    /// Bytes of recent conversation entries and inbox bodies a shard keeps in memory; older
    /// ones are read from disk (0: none kept once durable).
    log_cache_bytes_max: u64 = 8 << 20, LimitRange::at_least(0);
    /// A conversation's disk index keeps an entry per this many of its entries at most.
    log_index_stride_records: u64 = 256, LimitRange::between(1, 1 << 20);
    /// Bytes one disk read of the log asks for.
    log_read_bytes_max: usize = 256 << 10, LimitRange::between(4096, 16 << 20);
    /// Disk reads of the log one shard has in flight at once.
    log_reads_inflight_max: usize = 16, LimitRange::between(1, 4096);
}

/// `Err(Relation)` unless `ok`; the strings are only built for an error.
fn relation(
    ok: bool,
    subject: impl FnOnce() -> String,
    relation: &'static str,
    other: impl FnOnce() -> String,
    why: &'static str,
) -> Result<(), LimitsError> {
    if ok {
        return Ok(());
    }
    Err(LimitsError::Relation {
        subject: subject(),
        relation,
        other: other(),
        why,
    })
}

impl Limits {
    /// The node's default shard count for a machine with `cores` cores: one per core, at
    /// most [`SHARDS_DEFAULT_MAX`].
    pub fn shards_for_cores(cores: usize) -> u32 {
        u32::try_from(cores)
            .unwrap_or(u32::MAX)
            .clamp(1, SHARDS_DEFAULT_MAX)
    }

    /// Largest `send`/`append` body: `frame_bytes_max` less [`BODY_FRAMING_BYTES`], room for
    /// what a `deliver` or `event` frame adds around the body, so no frame the node sends is
    /// over `frame_bytes_max` (1,047,552 bytes by default).
    pub fn body_bytes_max(&self) -> usize {
        self.frame_bytes_max.saturating_sub(BODY_FRAMING_BYTES)
    }

    /// Replies one session can be owed at once (the rule is
    /// [`crate::host::session_replies_owed_max`]); `usize::MAX` if that overflows.
    pub fn session_replies_owed_max(&self) -> usize {
        session_replies_owed_max(
            self.push_credit_frames_max,
            self.shards,
            self.inflight_requests_max,
        )
        .unwrap_or(usize::MAX)
    }

    /// Capacity of a session's reply channel, in reply batches: every reply it can be owed
    /// plus slack ([`crate::host::session_reply_queue_batches_min`]), so a shard's `try_send`
    /// fails only for a session that stopped taking replies (closed as `overloaded`).
    pub fn session_reply_queue_max(&self) -> usize {
        session_reply_queue_batches_min(
            self.push_credit_frames_max,
            self.shards,
            self.inflight_requests_max,
        )
        .unwrap_or(usize::MAX)
    }

    /// Frames a session core holds for its transport before closing as `overloaded`: all it
    /// can be owed (every shard's push credit included) and at least the floor.
    pub fn pending_transmit_frames_max(&self) -> usize {
        self.session_replies_owed_max()
            .max(PENDING_TRANSMIT_FRAMES_FLOOR)
    }

    /// What a session can be owed, spelled out with the limits' names and values.
    fn owed_terms(&self) -> String {
        format!(
            "inflight_requests_max {} + {} (one batch frame) + push_credit_frames_max {} x \
             shards {} = {}",
            self.inflight_requests_max,
            fabric_proto::BATCH_OPS_MAX,
            self.push_credit_frames_max,
            self.shards,
            self.session_replies_owed_max()
        )
    }

    /// Every limit in its range, then every relation between limits (see the methods
    /// below); the first failure is returned, naming the limits and their values.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for e in self.entries() {
            if !e.range.contains(e.value) {
                return Err(LimitsError::OutOfRange {
                    key: e.key,
                    value: e.value,
                    range: e.range,
                });
            }
        }
        self.validate_relations()?;
        self.check_reply_queue(self.session_reply_queue_max())?;
        self.check_session_config(&self.session_config())
    }

    /// The relations among the settable limits themselves.
    fn validate_relations(&self) -> Result<(), LimitsError> {
        relation(
            self.partitions >= self.shards,
            || format!("partitions {}", self.partitions),
            "below",
            || format!("shards {}", self.shards),
            "every shard must own at least one partition",
        )?;
        relation(
            self.inbox_backlog_bytes_max >= self.body_bytes_max().widen(),
            || format!("inbox_backlog_bytes_max {}", self.inbox_backlog_bytes_max),
            "below",
            || {
                format!(
                    "the largest body, frame_bytes_max {} - {BODY_FRAMING_BYTES} = {}",
                    self.frame_bytes_max,
                    self.body_bytes_max()
                )
            },
            "the largest message could never be sent",
        )?;
        relation(
            self.mesh_inbox_backlog_bytes_max >= self.inbox_backlog_bytes_max,
            || {
                format!(
                    "mesh_inbox_backlog_bytes_max {}",
                    self.mesh_inbox_backlog_bytes_max
                )
            },
            "below",
            || format!("inbox_backlog_bytes_max {}", self.inbox_backlog_bytes_max),
            "a mesh's backlog must hold at least one peer's",
        )
    }

    /// A session reply channel of `capacity` batches must hold every reply the session can
    /// be owed, or a shard would find it full while the session is healthy (and close it);
    /// and at most [`SESSION_REPLY_QUEUE_LIMIT`], the memory one stuck session may pin.
    pub fn check_reply_queue(&self, capacity: usize) -> Result<(), LimitsError> {
        let owed = self.session_replies_owed_max();
        relation(
            owed <= SESSION_REPLY_QUEUE_LIMIT,
            || format!("what a session can be owed, {}", self.owed_terms()),
            "above",
            || format!("{SESSION_REPLY_QUEUE_LIMIT}"),
            "the most a session's reply channel may hold",
        )?;
        relation(
            capacity >= owed,
            || format!("session_reply_queue_max {capacity}"),
            "below",
            || format!("what a session can be owed: {}", self.owed_terms()),
            "a shard would find a healthy session's reply channel full",
        )
    }

    /// A session core's limits must agree with these: its transmit cap covers every shard's
    /// push credit and its in-flight answers (or a burst from all shards closes a healthy
    /// session), and its frame limit covers the largest `deliver` frame it can produce for
    /// the largest body it accepts.
    pub fn check_session_config(&self, c: &SessionConfig) -> Result<(), LimitsError> {
        relation(
            c.pending_transmit_frames_max >= self.session_replies_owed_max(),
            || {
                format!(
                    "pending_transmit_frames_max {}",
                    c.pending_transmit_frames_max
                )
            },
            "below",
            || format!("what a session can be owed: {}", self.owed_terms()),
            "a burst from every shard would close a healthy session",
        )?;
        relation(
            c.body_bytes_max.saturating_add(BODY_FRAMING_BYTES) <= c.frame_bytes_max,
            || {
                format!(
                    "the largest deliver frame, body_bytes_max {} + {BODY_FRAMING_BYTES}",
                    c.body_bytes_max
                )
            },
            "above",
            || format!("frame_bytes_max {}", c.frame_bytes_max),
            "the node would send a frame larger than it allows",
        )
    }

    /// Shard `shard`'s core limits. Every field is set here (no `..Default`), so a new
    /// shard limit cannot be forgotten.
    pub fn shard_config(&self, shard: fabric_proto::internal::ShardIdx) -> ShardConfig {
        ShardConfig {
            shard,
            wal_segment_bytes_max: self.wal_segment_bytes_max,
            wal_batch_bytes_max: self.wal_batch_bytes_max,
            retention_bytes_max: self.retention_bytes_max,
            push_credit_frames_max: self.push_credit_frames_max,
            drain_scan_entries_max: self.drain_scan_entries_max,
            pending_acks_max: self.pending_acks_max,
            body_bytes_max: self.body_bytes_max(),
            inbox_backlog_bytes_max: self.inbox_backlog_bytes_max,
            mesh_inbox_backlog_bytes_max: self.mesh_inbox_backlog_bytes_max,
            mesh_conversations_max: self.mesh_conversations_max,
            // In range by `validate` (at most u32::MAX).
            session_subscriptions_max: u32::try_from(self.session_subscriptions_max)
                .unwrap_or(u32::MAX),
            log_cache_bytes_max: self.log_cache_bytes_max,
            log_index_stride_records: self.log_index_stride_records,
            log_read_bytes_max: self.log_read_bytes_max,
            log_reads_inflight_max: self.log_reads_inflight_max,
            planted: fabric_shard::PlantedBugs::default(),
        }
    }

    /// The session core's limits (every limit set here; `nodes`, not a limit, empty: the node
    /// adds its cluster's members).
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            frame_bytes_max: self.frame_bytes_max,
            inflight_requests_max: self.inflight_requests_max,
            hello_timeout_ms: self.hello_timeout_ms,
            pending_transmit_frames_max: self.pending_transmit_frames_max(),
            out_batch_ops_max: self.out_batch_ops_max,
            body_bytes_max: self.body_bytes_max(),
            subscriptions_max: self.session_subscriptions_max,
            ping_interval_ms: self.ping_interval_ms,
            pong_timeout_ms: self.pong_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            prehello_frames_max: self.prehello_frames_max,
            prehello_answers_max: self.prehello_answers_max,
            nodes: Vec::new().into(),
        }
    }

    /// The shard host's restart policy: only its longest backoff is a node limit.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            restart_backoff_ms_max: self.restart_backoff_ms_max,
            ..RestartPolicy::default()
        }
    }

    /// The node's placement router.
    pub fn router(&self) -> Result<Router, RouterError> {
        Router::new(self.partitions, self.shards)
    }
}

#[cfg(test)]
mod tests;
