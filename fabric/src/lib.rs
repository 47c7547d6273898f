//! The Fabric node: the glue that runs the sans-IO cores (`fabric-edge`, `fabric-router`,
//! `fabric-shard`) on tokio, ractor and real files and sockets, and the Rust client.
//!
//! Nothing here decides protocol or storage questions; it moves bytes, batches and files.

//! With default features (`server`) this is the node and the client; with
//! `--no-default-features --features client` only the client and what it needs (QUIC and
//! WebSocket transports, TLS trust, key identities), with no axum, ractor or metrics exporter.

// The client's side.
pub mod client;
pub(crate) mod client_io;
pub mod files;
pub mod identity;
pub mod quic;
pub mod tls;

// The node's side.
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
pub mod logging;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod node;
#[cfg(feature = "server")]
pub(crate) mod rest;
#[cfg(feature = "server")]
pub(crate) mod session;
#[cfg(feature = "server")]
pub mod shard_actor;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "server")]
pub mod ws;

/// Largest `frame_bytes_max` accepted: a body (at most a frame) must fit in one WAL record
/// (`fabric_shard::wal::RECORD_BYTES_MAX`, 16 MiB) with its ids and headers, with room to spare.
pub const FRAME_BYTES_MAX_LIMIT: usize = 8 << 20;
#[cfg(feature = "server")]
const _: () = assert!(FRAME_BYTES_MAX_LIMIT == fabric_router::limits::FRAME_BYTES_MAX_LIMIT);

/// Wall-clock milliseconds since the Unix epoch: the `now` the cores are given.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
