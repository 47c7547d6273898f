//! Fabric's wire vocabulary: the client protocol (ops and server frames), stable error codes,
//! identifiers and limits, and the messages that travel between the edge, the router and the
//! shards inside a node.
//!
//! Layers are separated by data, mini-redis style:
//! - bytes <-> frames: [`codec`] (JSON text frames and postcard binary frames; the only module
//!   that knows either encoding),
//! - frames: [`ClientOp`] and [`ServerOp`],
//! - node-internal requests: [`internal`].
//!
//! Nothing here does I/O or reads a clock.

pub mod codec;
pub mod error;
pub mod hello;
pub mod ids;
pub mod internal;
pub mod ops;

pub use error::{ErrorCode, ProtoError};
pub use ids::{
    validate_conv, validate_id, validate_key, ConvId, GroupId, IdKind, MeshId, PeerId, Target,
};
pub use ops::{Body, ClientOp, DeliveredEvent, ServerOp};

/// Largest WebSocket frame (or HTTP body) a node accepts unless configured otherwise.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Largest mesh, peer, group or conversation id, in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Largest idempotency key, in bytes.
pub const KEY_BYTES_MAX: usize = 128;
/// Most ops one batched frame (a JSON array or a binary `Batch`) may carry.
pub const BATCH_OPS_MAX: usize = 1024;
/// Deepest nesting of arrays and objects in a message body (so that every recipient's JSON
/// parser can read the frame it is delivered in: serde_json stops at 128 levels in all).
pub const BODY_NESTING_MAX: usize = 64;
/// Most groups one peer may belong to.
pub const PEER_GROUPS_MAX: usize = 64;
/// Most messages one HTTP replay page returns.
pub const READ_LIMIT_MAX: u32 = 10_000;
