//! Placement and forwarding: which shard owns a key, and per-shard batching of requests.
//!
//! Sans-IO like every core: no clock, no threads, no I/O. `handle_request` takes requests in,
//! `poll_batch` hands per-shard batches out; the glue moves them to the shard actors.
//!
//! # Placement (persisted: never change it)
//!
//! A key hashes with xxh3-64 (seed 0) into one of `partitions` partitions (`hash % partitions`);
//! partition `p` lives on shard `p % shards`. The hash name, the partition count and the shard
//! count are written next to the data ([`PlacementMeta`]) and checked at every start: changing
//! any of them would send keys to shards that do not hold their data.
//!
//! Keys, pinned forever (the unit test `hash_values_are_pinned` fails if they drift):
//! - inbox traffic, peers and mesh metadata: the mesh id's UTF-8 bytes;
//! - conversations: the mesh id's bytes, one NUL byte (`b"\0"`), the conversation id's bytes.
//!   Ids cannot contain NUL (see `fabric_proto::validate_id`), so two different
//!   `(mesh, conversation)` pairs never make the same key.
//!
//! # Batching
//!
//! Each session owns a `Router` (a clone of the node's), so batching needs no locks and a
//! session's requests to one shard stay in the order the session produced them. One batch per
//! shard per hand-off is what carries the hot path: a shard actor takes one message for many
//! requests instead of one message each.

pub mod host;
pub mod limits;
pub mod supervise;

use fabric_proto::internal::{Placement, Request, Route, ShardIdx};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// The persisted name of the placement hash.
pub const HASH_NAME: &str = "xxh3-64";
/// Most partitions a node may have (partition indexes then fit 16 bits).
pub const PARTITIONS_MAX: u32 = 65_536;
/// Requests per batch unless configured otherwise.
pub const BATCH_REQUESTS_MAX_DEFAULT: usize = 256;

/// Conversation keys up to this length are built on the stack: two ids at their limit plus the
/// separator. Longer ones (never produced by validated input) take a heap buffer instead.
const CONV_KEY_STACK_BYTES_MAX: usize = 2 * fabric_proto::ID_BYTES_MAX + 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// The partition/shard/batch settings cannot work.
    #[error("invalid placement: {0}")]
    Invalid(String),
    /// The data directory was written with another placement.
    #[error(
        "placement mismatch: the data directory was written with hash {stored_hash}, \
         {stored_partitions} partitions, {stored_shards} shards, but this node is configured \
         for hash {hash}, {partitions} partitions, {shards} shards; keys would land on shards \
         that do not hold their data, so start the node with the stored settings"
    )]
    Mismatch {
        stored_hash: String,
        stored_partitions: u32,
        stored_shards: u32,
        hash: String,
        partitions: u32,
        shards: u32,
    },
}

/// What a data directory's placement is; stored at first start, checked at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMeta {
    pub hash: String,
    pub partitions: u32,
    pub shards: u32,
}

impl PlacementMeta {
    /// Ok if `stored` (read from the data dir) is the same placement as `self` (configured).
    pub fn check(&self, stored: &PlacementMeta) -> Result<(), RouterError> {
        if self == stored {
            return Ok(());
        }
        Err(RouterError::Mismatch {
            stored_hash: stored.hash.clone(),
            stored_partitions: stored.partitions,
            stored_shards: stored.shards,
            hash: self.hash.clone(),
            partitions: self.partitions,
            shards: self.shards,
        })
    }
}

/// The partition of a key: xxh3-64 of the key bytes (see the module docs) modulo `partitions`.
/// `None` for broadcast messages, which have no key, and for `partitions == 0`, which has no
/// partition to give (a `Router` never asks for that).
pub fn partition_of(p: Placement<'_>, partitions: u32) -> Option<u32> {
    if partitions == 0 {
        return None;
    }
    let h = match p {
        Placement::Mesh(mesh) => xxh3_64(mesh.as_bytes()),
        Placement::Conversation(mesh, conv) => {
            let len = mesh.len() + 1 + conv.len();
            // The hot path (every append) should not allocate for a hash key.
            if len <= CONV_KEY_STACK_BYTES_MAX {
                let mut key = [0u8; CONV_KEY_STACK_BYTES_MAX];
                key[..mesh.len()].copy_from_slice(mesh.as_bytes());
                key[mesh.len()] = 0;
                key[mesh.len() + 1..len].copy_from_slice(conv.as_bytes());
                xxh3_64(&key[..len])
            } else {
                let mut key = Vec::with_capacity(len);
                key.extend_from_slice(mesh.as_bytes());
                key.push(0);
                key.extend_from_slice(conv.as_bytes());
                xxh3_64(&key)
            }
        }
        Placement::Broadcast => return None,
    };
    // The remainder is below `partitions`, a u32, so the cast is lossless.
    Some((h % u64::from(partitions)) as u32)
}

/// Placement plus the per-shard batches of one session.
///
/// Queue limit: the batches hold what the owning session produced since the glue last drained
/// them with `poll_batch` (the glue drains after every hand-off), and the session bounds that
/// (its in-flight limit); `batch_requests_max` bounds what one `poll_batch` hands out.
#[derive(Debug, Clone)]
pub struct Router {
    partitions: u32,
    shards: u32,
    batch_requests_max: usize,
    /// One pending batch per shard, in arrival order.
    batches: Vec<Vec<Request>>,
    /// Next shard `poll_batch` looks at. Batches come out in passes over the shards in
    /// ascending order, one batch per shard per pass, so a shard with a long backlog cannot
    /// starve the others; the pass restarts at shard 0 once everything is drained, which keeps
    /// the order a pure function of the input (the simulator replays it).
    cursor: usize,
    /// Requests queued and not yet polled.
    queued: usize,
    /// Requests dropped because they named a shard this router does not have.
    misrouted: u64,
}

impl Router {
    /// A router with the default batch size ([`BATCH_REQUESTS_MAX_DEFAULT`]).
    pub fn new(partitions: u32, shards: u32) -> Result<Router, RouterError> {
        Router::with_batch_limit(partitions, shards, BATCH_REQUESTS_MAX_DEFAULT)
    }

    /// `1 <= shards <= partitions <= PARTITIONS_MAX` (every shard owns at least one partition)
    /// and `batch_requests_max >= 1`.
    pub fn with_batch_limit(
        partitions: u32,
        shards: u32,
        batch_requests_max: usize,
    ) -> Result<Router, RouterError> {
        if shards == 0 || partitions == 0 {
            return Err(RouterError::Invalid(format!(
                "shards ({shards}) and partitions ({partitions}) must be at least 1"
            )));
        }
        if partitions < shards {
            return Err(RouterError::Invalid(format!(
                "partitions ({partitions}) must be at least shards ({shards}), \
                 or some shards would own no partition"
            )));
        }
        if partitions > PARTITIONS_MAX {
            return Err(RouterError::Invalid(format!(
                "partitions ({partitions}) must be at most {PARTITIONS_MAX}"
            )));
        }
        if batch_requests_max == 0 {
            return Err(RouterError::Invalid(
                "batch_requests_max must be at least 1".into(),
            ));
        }
        Ok(Router {
            partitions,
            shards,
            batch_requests_max,
            batches: vec![Vec::new(); shards as usize],
            cursor: 0,
            queued: 0,
            misrouted: 0,
        })
    }

    /// The placement to persist and check against the data dir.
    pub fn meta(&self) -> PlacementMeta {
        PlacementMeta {
            hash: HASH_NAME.to_string(),
            partitions: self.partitions,
            shards: self.shards,
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Most requests one `poll_batch` returns.
    pub fn batch_requests_max(&self) -> usize {
        self.batch_requests_max
    }

    /// The shard that owns a key; `None` for broadcast messages.
    pub fn shard_of(&self, p: Placement<'_>) -> Option<ShardIdx> {
        partition_of(p, self.partitions).map(|part| part % self.shards)
    }

    /// Queues a request into the batch of the shard(s) it goes to. `ByKey` requests whose op
    /// has no key (`Flushed`, `Closed`) go to every shard, as `AllShards` ones do. A
    /// `Shard(idx)` naming a shard this router does not have is dropped and counted in
    /// [`Router::misrouted`]: sending it anywhere else would hand push credit to shards that
    /// never spent it.
    pub fn handle_request(&mut self, _now: u64, route: Route, req: Request) {
        let target = match route {
            Route::ByKey => self.shard_of(req.op.placement()),
            Route::Shard(s) if s < self.shards => Some(s),
            Route::Shard(_) => {
                self.misrouted += 1;
                return;
            }
            Route::AllShards => None,
        };
        match target {
            Some(s) => {
                self.batches[s as usize].push(req);
                self.queued += 1;
            }
            None => {
                // The last shard takes the original, the others a clone each.
                let n = self.batches.len();
                for b in &mut self.batches[..n - 1] {
                    b.push(req.clone());
                }
                self.batches[n - 1].push(req);
                self.queued += n;
            }
        }
    }

    /// The next non-empty batch, at most `batch_requests_max` long, or `None` when nothing is
    /// queued. Batches come in ascending shard order (see `cursor`); each shard's requests
    /// come out in the order they went in.
    pub fn poll_batch(&mut self) -> Option<(ShardIdx, Vec<Request>)> {
        if self.queued == 0 {
            self.cursor = 0;
            return None;
        }
        let n = self.batches.len();
        for k in 0..n {
            let s = (self.cursor + k) % n;
            let b = &mut self.batches[s];
            if b.is_empty() {
                continue;
            }
            let batch = if b.len() <= self.batch_requests_max {
                std::mem::take(b)
            } else {
                let rest = b.split_off(self.batch_requests_max);
                std::mem::replace(b, rest)
            };
            self.queued -= batch.len();
            self.cursor = if self.queued == 0 { 0 } else { (s + 1) % n };
            return Some((s as ShardIdx, batch));
        }
        // Unreachable while `queued` counts right; recover rather than loop or panic.
        self.queued = 0;
        self.cursor = 0;
        None
    }

    /// Requests queued and not yet polled.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Requests dropped since creation because their `Route::Shard` index was out of range
    /// (a bug in the caller; the glue may log or export it).
    pub fn misrouted(&self) -> u64 {
        self.misrouted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::internal::ShardOp;
    use fabric_proto::{MeshId, PeerId};

    fn ack(session: u64, mesh: &str) -> Request {
        Request {
            session,
            op: ShardOp::Ack {
                mesh: MeshId::must(mesh),
                peer: PeerId::must("p"),
                upto: session,
            },
        }
    }

    fn closed(session: u64) -> Request {
        Request {
            session,
            op: ShardOp::Closed,
        }
    }

    fn drain(r: &mut Router) -> Vec<(ShardIdx, Vec<u64>)> {
        let mut out = Vec::new();
        while let Some((s, b)) = r.poll_batch() {
            assert!(!b.is_empty(), "poll_batch never returns an empty batch");
            out.push((s, b.iter().map(|q| q.session).collect()));
        }
        out
    }

    #[test]
    fn hash_values_are_pinned() {
        // Proves the placement hash and key layout never change silently: data sits on disk by them.
        assert_eq!(HASH_NAME, "xxh3-64");
        // The published XXH3-64 (seed 0) of the empty input.
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(xxh3_64(b"mesh-1"), 0x11f6_a254_38ac_c957);
        assert_eq!(xxh3_64(b"demo"), 0x07f7_2fb3_af45_6330);
        assert_eq!(xxh3_64(b"demo\0standup"), 0x655d_b53f_eb51_8cf0);
        assert_eq!(
            partition_of(Placement::Mesh("mesh-1"), 65_536),
            Some(51_543)
        );
        assert_eq!(partition_of(Placement::Mesh("demo"), 256), Some(48));
        assert_eq!(
            partition_of(Placement::Mesh("acme:prod"), 65_536),
            Some(25_928)
        );
        assert_eq!(
            partition_of(Placement::Conversation("m", "c"), 65_536),
            Some(18_001)
        );
        assert_eq!(
            partition_of(Placement::Conversation("demo", "standup"), 256),
            Some(240)
        );
        assert_eq!(partition_of(Placement::Broadcast, 16), None);
        assert_eq!(partition_of(Placement::Mesh("m"), 0), None, "no panic on 0");
        // Partition -> shard is `p % shards`.
        let r = Router::new(256, 5).unwrap();
        assert_eq!(r.shard_of(Placement::Mesh("demo")), Some(48 % 5));
        assert_eq!(r.shard_of(Placement::Broadcast), None);
    }

    #[test]
    fn long_conversation_keys_hash_like_short_ones() {
        // Proves the stack and heap key buffers build the same key (mesh, NUL, conversation).
        let mesh = "m".repeat(200);
        let conv = "c".repeat(200);
        let mut key = mesh.clone().into_bytes();
        key.push(0);
        key.extend_from_slice(conv.as_bytes());
        let want = (xxh3_64(&key) % 65_536) as u32;
        assert_eq!(
            partition_of(Placement::Conversation(&mesh, &conv), 65_536),
            Some(want)
        );
        let (m, c) = ("m".repeat(128), "c".repeat(128));
        let key = format!("{m}\0{c}");
        assert_eq!(
            partition_of(Placement::Conversation(&m, &c), 65_536),
            Some((xxh3_64(key.as_bytes()) % 65_536) as u32)
        );
    }

    #[test]
    fn keys_spread_over_shards() {
        // Proves 10k distinct meshes and conversations land on every shard, none with more than
        // twice or less than half its share.
        let r = Router::new(256, 4).unwrap();
        let mut meshes = [0u32; 4];
        let mut convs = [0u32; 4];
        for i in 0..10_000 {
            let mesh = format!("mesh-{i}");
            meshes[r.shard_of(Placement::Mesh(&mesh)).unwrap() as usize] += 1;
            let conv = format!("conv-{i}");
            convs[r.shard_of(Placement::Conversation("m", &conv)).unwrap() as usize] += 1;
        }
        for counts in [meshes, convs] {
            assert!(
                counts.iter().all(|c| *c > 1_250 && *c < 5_000),
                "{counts:?}"
            );
        }
        // Partitions too: 100k keys over 1024 partitions (about 98 each), none far off.
        let mut parts = vec![0u32; 1024];
        for i in 0..100_000 {
            let p = partition_of(Placement::Mesh(&format!("k{i}")), 1024).unwrap();
            parts[p as usize] += 1;
        }
        assert!(
            parts.iter().all(|c| *c > 40 && *c < 200),
            "uneven partitions"
        );
    }

    #[test]
    fn placement_mismatch_is_refused_with_both_values() {
        // Proves a data dir written with another placement is refused, naming both settings.
        let ours = Router::new(256, 2).unwrap().meta();
        assert_eq!(
            ours,
            PlacementMeta {
                hash: "xxh3-64".into(),
                partitions: 256,
                shards: 2
            }
        );
        assert!(ours.check(&ours.clone()).is_ok());
        let stored = Router::new(512, 4).unwrap().meta();
        let e = ours.check(&stored).unwrap_err().to_string();
        assert!(
            e.contains("written with hash xxh3-64, 512 partitions, 4 shards")
                && e.contains("configured for hash xxh3-64, 256 partitions, 2 shards"),
            "{e}"
        );
        let other_hash = PlacementMeta {
            hash: "fnv".into(),
            ..ours.clone()
        };
        let e = ours.check(&other_hash).unwrap_err().to_string();
        assert!(e.contains("hash fnv") && e.contains("hash xxh3-64"), "{e}");
    }

    #[test]
    fn invalid_settings_are_refused() {
        // Proves the constructor refuses settings under which some key or shard has no home.
        assert!(Router::new(2, 4).is_err(), "partitions < shards");
        assert!(Router::new(0, 0).is_err());
        assert!(Router::new(4, 0).is_err());
        assert!(Router::new(PARTITIONS_MAX + 1, 1).is_err());
        assert!(Router::new(PARTITIONS_MAX, 1).is_ok());
        assert!(Router::new(1, 1).is_ok());
        assert!(Router::with_batch_limit(16, 2, 0).is_err());
        assert_eq!(Router::new(16, 2).unwrap().batch_requests_max(), 256);
    }

    #[test]
    fn batches_keep_order_split_at_the_limit_and_broadcast() {
        // Proves per-shard order is kept, batches never exceed the limit, and broadcasts (both
        // AllShards and keyless ByKey ops) reach every shard.
        let mut r = Router::with_batch_limit(16, 2, 3).unwrap();
        let shard = r.shard_of(Placement::Mesh("m")).unwrap();
        for s in 0..5 {
            r.handle_request(0, Route::ByKey, ack(s, "m"));
        }
        r.handle_request(0, Route::AllShards, closed(9));
        r.handle_request(0, Route::Shard(1 - shard), ack(7, "m"));
        r.handle_request(0, Route::ByKey, closed(10));
        assert_eq!(r.queued(), 5 + 2 + 1 + 2);
        let seen = drain(&mut r);
        assert!(seen.iter().all(|(_, b)| b.len() <= 3));
        let of = |want: ShardIdx| -> Vec<u64> {
            seen.iter()
                .filter(|(s, _)| *s == want)
                .flat_map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(of(shard), vec![0, 1, 2, 3, 4, 9, 10]);
        assert_eq!(of(1 - shard), vec![9, 7, 10]);
        assert_eq!(r.queued(), 0);
        assert!(r.poll_batch().is_none());
    }

    #[test]
    fn batches_come_in_shard_order_and_no_shard_starves() {
        // Proves each drain visits shards in ascending order, one batch per shard per pass, and
        // starts again at shard 0 after a full drain.
        let mut r = Router::with_batch_limit(4, 4, 2).unwrap();
        for i in 0..5 {
            r.handle_request(0, Route::Shard(2), ack(i, "m"));
        }
        r.handle_request(0, Route::Shard(0), ack(10, "m"));
        r.handle_request(0, Route::Shard(3), ack(30, "m"));
        assert_eq!(
            drain(&mut r),
            vec![
                (0, vec![10]),
                (2, vec![0, 1]),
                (3, vec![30]),
                (2, vec![2, 3]),
                (2, vec![4]),
            ]
        );
        // The next drain starts at shard 0 again, not where the last one stopped.
        r.handle_request(0, Route::Shard(3), ack(31, "m"));
        r.handle_request(0, Route::Shard(1), ack(11, "m"));
        assert_eq!(drain(&mut r), vec![(1, vec![11]), (3, vec![31])]);
    }

    #[test]
    fn an_unknown_shard_index_is_dropped_and_counted() {
        // Proves a Route::Shard beyond the shard count neither panics nor credits other shards.
        let mut r = Router::new(16, 2).unwrap();
        r.handle_request(
            0,
            Route::Shard(7),
            Request {
                session: 1,
                op: ShardOp::Flushed { frames: 3 },
            },
        );
        assert_eq!(r.misrouted(), 1);
        assert_eq!(r.queued(), 0);
        assert!(r.poll_batch().is_none());
    }
}
