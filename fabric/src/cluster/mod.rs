//! Node-to-node plumbing for a replicated cluster: the cluster PKI ([`pki`]) and the mutually
//! authenticated QUIC link between nodes ([`link`]).
//!
//! Nothing in `fabric serve` uses these yet; Raft replication will carry its messages over
//! [`link::NodeLink`].

pub mod link;
pub mod pki;

pub use link::{
    GroupStream, Heartbeats, Incoming, LinkConfig, LinkError, NodeLink, PeerConn, Refusal,
    ALPN_NODE,
};
pub use pki::{ClusterCa, NodeCert, NodeIdentity, PkiError};
