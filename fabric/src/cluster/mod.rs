//! Node-to-node plumbing for a replicated cluster: the cluster PKI ([`pki`]).
//!
//! Nothing in `fabric serve` uses this yet.

pub mod pki;

pub use pki::{ClusterCa, NodeCert, NodeIdentity, PkiError};
