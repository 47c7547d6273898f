//! Node-to-node plumbing for a replicated cluster: the cluster PKI ([`pki`]), the mutually
//! authenticated QUIC link between nodes ([`link`]), the `[cluster]` section of a node's
//! configuration ([`config`]), and the `fabric cluster` commands: `init` writes a cluster's
//! files ([`init`]), `local` runs its nodes as child processes ([`local`]).
//!
//! `fabric serve` validates and loads the `[cluster]` section but does not replicate yet; Raft
//! replication will carry its messages over [`link::NodeLink`].

pub mod config;
pub mod init;
pub mod link;
pub mod local;
pub mod pki;

pub use link::{
    GroupStream, Heartbeats, Incoming, LinkConfig, LinkError, NodeLink, PeerConn, Refusal,
    ALPN_NODE,
};
pub use pki::{ClusterCa, NodeCert, NodeIdentity, PkiError};
