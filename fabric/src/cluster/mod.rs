//! Node-to-node plumbing for a replicated cluster: the cluster PKI ([`pki`]), the mutually
//! authenticated QUIC link between nodes ([`link`]), and a node's links to every other member
//! over it ([`links`]).
//!
//! Nothing in `fabric serve` uses these yet; Raft replication will carry its messages over
//! [`link::NodeLink`].

pub mod link;
pub mod links;
pub mod pki;
pub mod runtime;

pub use link::{
    GroupStream, Heartbeats, Incoming, LinkConfig, LinkError, NodeLink, PeerConn, Refusal,
    ALPN_NODE,
};
pub use links::{Inbound, LinksLimits, LinksStats, Member, NodeLinks, PeerStatus};
pub use pki::{ClusterCa, NodeCert, NodeIdentity, PkiError};
