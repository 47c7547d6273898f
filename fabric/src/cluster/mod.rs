//! Node-to-node plumbing for a replicated cluster: the cluster PKI ([`pki`]), the mutually
//! authenticated QUIC link between nodes ([`link`]), a node's links to every other member over
//! it ([`links`]), the replicated shard hosts' frames on those links ([`runtime`]), the
//! `[cluster]` section of a node's configuration ([`config`]), and the `fabric cluster`
//! commands: `init` writes a cluster's files ([`init`]), `local` runs its nodes as child
//! processes ([`local`]).

pub mod config;
pub mod directory;
pub mod init;
pub mod join;
pub mod link;
pub mod links;
pub mod local;
pub mod pki;
pub mod runtime;

pub use link::{
    GroupStream, Incoming, LinkConfig, LinkError, NodeLink, PeerConn, Refusal, ALPN_NODE,
};
pub use links::{Inbound, LinksLimits, LinksStats, Member, NodeLinks, PeerStatus};
pub use pki::{ClusterCa, NodeCert, NodeIdentity, PkiError};
