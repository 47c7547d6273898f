//! Placement and forwarding: which shard owns a key, and per-shard batching of requests.
//!
//! A key hashes (xxh3-64, seed 0) into one of `partitions` partitions; partition `p` lives on
//! shard `p % shards`. The hash name, partition count and shard count are persisted with the
//! data ([`PlacementMeta`]): changing any of them would send keys to shards that do not hold
//! their data, so a node refuses to start on a mismatch.
//!
//! Keys, pinned forever:
//! - inbox traffic, peers and mesh metadata: the mesh id's UTF-8 bytes;
//! - conversations: mesh bytes, one `0` byte, conversation bytes (ids cannot contain `0`).

use fabric_proto::internal::{Placement, Request, Route, ShardIdx};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// The persisted name of the placement hash.
pub const HASH_NAME: &str = "xxh3-64";
/// Most partitions a node may have.
pub const PARTITIONS_MAX: u32 = 65_536;
/// Requests per batch unless configured otherwise.
pub const BATCH_REQUESTS_MAX_DEFAULT: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("invalid placement: {0}")]
    Invalid(String),
    #[error(
        "the data was written with placement {stored_hash}/{stored_partitions} partitions/{stored_shards} shards, \
         but this node is configured for {hash}/{partitions}/{shards}; keys would land on shards \
         that do not hold their data (start with the stored settings)"
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
    /// Ok if `stored` (read from the data dir) is the same placement as `self`.
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

/// The partition of a key, or `None` for broadcast messages.
pub fn partition_of(p: Placement<'_>, partitions: u32) -> Option<u32> {
    let h = match p {
        Placement::Mesh(mesh) => xxh3_64(mesh.as_bytes()),
        Placement::Conversation(mesh, conv) => {
            let mut key = Vec::with_capacity(mesh.len() + 1 + conv.len());
            key.extend_from_slice(mesh.as_bytes());
            key.push(0);
            key.extend_from_slice(conv.as_bytes());
            xxh3_64(&key)
        }
        Placement::Broadcast => return None,
    };
    Some((h % partitions as u64) as u32)
}

/// Placement plus the per-shard batches of one session (each session owns a clone, so
/// batching needs no locks and keeps each session's requests in order per shard).
#[derive(Debug, Clone)]
pub struct Router {
    partitions: u32,
    shards: u32,
    batch_requests_max: usize,
    batches: Vec<Vec<Request>>,
    /// Next shard `poll_batch` looks at, so that big batches for one shard do not starve others.
    cursor: usize,
}

impl Router {
    pub fn new(partitions: u32, shards: u32) -> Result<Router, RouterError> {
        Router::with_batch_limit(partitions, shards, BATCH_REQUESTS_MAX_DEFAULT)
    }

    pub fn with_batch_limit(
        partitions: u32,
        shards: u32,
        batch_requests_max: usize,
    ) -> Result<Router, RouterError> {
        if shards == 0 || partitions == 0 {
            return Err(RouterError::Invalid(
                "shards and partitions must be at least 1".into(),
            ));
        }
        if partitions < shards {
            return Err(RouterError::Invalid(format!(
                "partitions ({partitions}) must be at least shards ({shards})"
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
        })
    }

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

    /// The shard that owns a key; `None` for broadcast messages.
    pub fn shard_of(&self, p: Placement<'_>) -> Option<ShardIdx> {
        partition_of(p, self.partitions).map(|part| part % self.shards)
    }

    /// Queues a request into the batch of the shard(s) it goes to.
    pub fn handle_request(&mut self, _now: u64, route: Route, req: Request) {
        let target = match route {
            Route::ByKey => self.shard_of(req.op.placement()),
            Route::Shard(s) if s < self.shards => Some(s),
            // A shard index from another configuration: everyone, rather than nobody.
            Route::Shard(_) | Route::AllShards => None,
        };
        match target {
            Some(s) => self.batches[s as usize].push(req),
            None => {
                for b in &mut self.batches {
                    b.push(req.clone());
                }
            }
        }
    }

    /// The next non-empty batch, at most `batch_requests_max` long, visiting shards in turn.
    pub fn poll_batch(&mut self) -> Option<(ShardIdx, Vec<Request>)> {
        let n = self.batches.len();
        for k in 0..n {
            let s = (self.cursor + k) % n;
            let b = &mut self.batches[s];
            if b.is_empty() {
                continue;
            }
            self.cursor = (s + 1) % n;
            let batch = if b.len() <= self.batch_requests_max {
                std::mem::take(b)
            } else {
                let rest = b.split_off(self.batch_requests_max);
                std::mem::replace(b, rest)
            };
            return Some((s as ShardIdx, batch));
        }
        None
    }

    /// Requests queued and not yet polled.
    pub fn queued(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::internal::ShardOp;

    fn ack(session: u64, mesh: &str) -> Request {
        Request {
            session,
            op: ShardOp::Ack {
                mesh: mesh.into(),
                peer: "p".into(),
                upto: session,
            },
        }
    }

    #[test]
    fn hash_values_are_pinned() {
        // Proves the placement hash never changes silently: these values are on disk somewhere.
        assert_eq!(
            partition_of(Placement::Mesh("mesh-1"), 65_536),
            Some((xxh3_64(b"mesh-1") % 65_536) as u32)
        );
        assert_eq!(xxh3_64(b""), 0x2d06800538d394c2);
        assert_eq!(xxh3_64(b"mesh-1"), xxh3_64("mesh-1".as_bytes()));
        let conv = partition_of(Placement::Conversation("m", "c"), 1 << 16);
        assert_eq!(conv, Some((xxh3_64(b"m\0c") % 65_536) as u32));
        assert_eq!(partition_of(Placement::Broadcast, 16), None);
    }

    #[test]
    fn keys_spread_over_shards() {
        // Proves 10k distinct meshes land on every shard, none with more than twice its share.
        let r = Router::new(256, 4).unwrap();
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            counts[r.shard_of(Placement::Mesh(&format!("mesh-{i}"))).unwrap() as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| *c > 1_250 && *c < 5_000),
            "{counts:?}"
        );
    }

    #[test]
    fn placement_mismatch_is_refused_with_both_values() {
        // Proves a data dir written with another placement is refused, naming both.
        let ours = Router::new(256, 2).unwrap().meta();
        assert!(ours.check(&ours.clone()).is_ok());
        let stored = Router::new(256, 4).unwrap().meta();
        let e = ours.check(&stored).unwrap_err().to_string();
        assert!(e.contains("4 shards") && e.contains("/256/2"), "{e}");
        assert!(Router::new(2, 4).is_err());
        assert!(Router::new(0, 0).is_err());
        assert!(Router::new(PARTITIONS_MAX + 1, 1).is_err());
    }

    #[test]
    fn batches_keep_order_split_at_the_limit_and_broadcast() {
        // Proves per-shard order is kept, batches never exceed the limit, and broadcasts reach
        // every shard.
        let mut r = Router::with_batch_limit(16, 2, 3).unwrap();
        let shard = r.shard_of(Placement::Mesh("m")).unwrap();
        for s in 0..5 {
            r.handle_request(0, Route::ByKey, ack(s, "m"));
        }
        r.handle_request(
            0,
            Route::AllShards,
            Request {
                session: 9,
                op: ShardOp::Closed,
            },
        );
        r.handle_request(0, Route::Shard(1 - shard), ack(7, "m"));
        let mut seen: Vec<(u32, Vec<u64>)> = Vec::new();
        while let Some((s, b)) = r.poll_batch() {
            assert!(b.len() <= 3);
            seen.push((s, b.iter().map(|q| q.session).collect()));
        }
        let mine: Vec<u64> = seen
            .iter()
            .filter(|(s, _)| *s == shard)
            .flat_map(|(_, v)| v.clone())
            .collect();
        let other: Vec<u64> = seen
            .iter()
            .filter(|(s, _)| *s != shard)
            .flat_map(|(_, v)| v.clone())
            .collect();
        assert_eq!(mine, vec![0, 1, 2, 3, 4, 9]);
        assert_eq!(other, vec![9, 7]);
        assert_eq!(r.queued(), 0);
    }
}
