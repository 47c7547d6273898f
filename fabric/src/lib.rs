//! The Fabric node: the glue that runs the sans-IO cores (`fabric-edge`, `fabric-router`,
//! `fabric-shard`) on tokio, ractor and real files and sockets, and the Rust client.
//!
//! Nothing here decides protocol or storage questions; it moves bytes, batches and files.

pub mod client;
pub(crate) mod client_io;
pub mod config;
pub mod files;
pub mod http;
pub mod identity;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod quic;
pub(crate) mod session;
pub mod shard_actor;
pub mod storage;
pub mod tls;
pub mod ws;

/// Wall-clock milliseconds since the Unix epoch: the `now` the cores are given.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
