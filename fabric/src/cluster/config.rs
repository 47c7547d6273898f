//! The `[cluster]` section of a node's configuration: which cluster the node belongs to, its
//! node id, its node link's address and certificates, every member, and the replication
//! limits. Absent, the node is a cluster of its own (a single node).
//!
//! [`ClusterConfig::validate`] refuses a section that names no coherent cluster; every error
//! names the key and the value. `fabric serve` runs the node as a member of the cluster it
//! names (`crate::node`).

use super::link::{LinkConfig, NODE_FRAME_BYTES_MAX_DEFAULT, NODE_FRAME_BYTES_MAX_LIMIT};
use super::pki;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default `raft_heartbeat_ms`.
pub const RAFT_HEARTBEAT_MS_DEFAULT: u64 = 100;
/// Default `raft_election_timeout_ms`.
pub const RAFT_ELECTION_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// The replication factors a shard's Raft group may have.
pub const REPLICATION_FACTORS: [u32; 3] = [1, 3, 5];

/// The `[cluster]` section. Units are last in every name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster id (what its CA and every node certificate name; see
    /// [`pki::check_cluster_id`]).
    pub id: String,
    /// This node's id: one of the members' ids.
    pub node: u64,
    /// The node link's (QUIC) listen address.
    pub link_listen: SocketAddr,
    /// The cluster CA's certificate (PEM): the node link's only trust root.
    pub ca_cert: PathBuf,
    /// This node's certificate (PEM), issued by the cluster CA.
    pub node_cert: PathBuf,
    /// This node's private key (PEM).
    pub node_key: PathBuf,
    /// Replicas of each shard: 1, 3 or 5, at most the member count. Unset: the largest of 1, 3
    /// and 5 that is at most the member count ([`ClusterConfig::replication_factor`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    /// A Raft leader heartbeats its followers this often.
    #[serde(default = "default_raft_heartbeat_ms")]
    pub raft_heartbeat_ms: u64,
    /// A follower that hears no leader for this long starts an election; above
    /// `raft_heartbeat_ms`.
    #[serde(default = "default_raft_election_timeout_ms")]
    pub raft_election_timeout_ms: u64,
    /// Largest frame on the node link (see [`super::link`]).
    #[serde(default = "default_node_frame_bytes_max")]
    pub node_frame_bytes_max: usize,
    /// The group's voters when the cluster was created (`fabric cluster init`'s nodes): every
    /// shard's Raft group and the metadata group start with them, and their logs hold every
    /// change since. Unset: every member (a cluster as `init` wrote it). `fabric cluster
    /// add-node` writes it for a node that joins later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founders: Option<Vec<u64>>,
    /// Every node of the cluster this node knows at start, this one included (the metadata
    /// group holds the cluster's current members: `fabric cluster add-node`).
    pub members: Vec<Member>,
}

/// The largest node id: a session id carries its node's id in its top 16 bits.
pub const NODE_ID_MAX: u64 = 65_535;

/// One node of the cluster, as every other node reaches it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its node id.
    pub id: u64,
    /// Its node link address.
    pub link: SocketAddr,
    /// Its client base URL (HTTP and WebSocket), e.g. `http://127.0.0.1:7400`.
    pub http: String,
}

fn default_raft_heartbeat_ms() -> u64 {
    RAFT_HEARTBEAT_MS_DEFAULT
}

fn default_raft_election_timeout_ms() -> u64 {
    RAFT_ELECTION_TIMEOUT_MS_DEFAULT
}

fn default_node_frame_bytes_max() -> usize {
    NODE_FRAME_BYTES_MAX_DEFAULT
}

/// A `[cluster]` section that names no coherent cluster. Each names the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("cluster.id {value:?}: {message}")]
    BadId { value: String, message: String },
    #[error("cluster.{key} is 0; it must be at least 1")]
    Zero { key: &'static str },
    #[error(
        "cluster.node_frame_bytes_max {value} is above its limit {NODE_FRAME_BYTES_MAX_LIMIT}"
    )]
    FrameAboveLimit { value: usize },
    #[error(
        "cluster.raft_election_timeout_ms {election_ms} must be above cluster.raft_heartbeat_ms \
         {heartbeat_ms}"
    )]
    ElectionNotAboveHeartbeat { election_ms: u64, heartbeat_ms: u64 },
    #[error("cluster.members has id {id} twice")]
    DuplicateId { id: u64 },
    #[error("cluster.members has id {id}; node ids are 1 to {NODE_ID_MAX}")]
    IdOutOfRange { id: u64 },
    #[error("cluster.founders {value:?}: one to {NODE_ID_MAX} distinct node ids, at least one")]
    BadFounders { value: Vec<u64> },
    #[error("cluster.members has link {link} twice (members {first} and {second})")]
    DuplicateLink {
        link: SocketAddr,
        first: u64,
        second: u64,
    },
    #[error("cluster.members: member {id}'s http {value:?} is not an http:// or https:// URL")]
    BadHttp { id: u64, value: String },
    #[error("cluster.node {node} is not a member (cluster.members has ids {ids})")]
    NodeNotMember { node: u64, ids: String },
    #[error("cluster.replication_factor {value} is not 1, 3 or 5")]
    BadReplicationFactor { value: u32 },
    #[error("cluster.replication_factor {value} is above the member count {members}")]
    ReplicationAboveMembers { value: u32, members: usize },
}

/// The largest of 1, 3 and 5 that is at most `members` (1 when there are none).
pub fn default_replication_factor(members: usize) -> u32 {
    REPLICATION_FACTORS
        .into_iter()
        .rev()
        .find(|&f| f as usize <= members)
        .unwrap_or(1)
}

impl ClusterConfig {
    /// A section with these fields and every limit (and the replication factor) at its default.
    pub fn new(
        id: String,
        node: u64,
        link_listen: SocketAddr,
        ca_cert: PathBuf,
        node_cert: PathBuf,
        node_key: PathBuf,
        members: Vec<Member>,
    ) -> ClusterConfig {
        ClusterConfig {
            id,
            node,
            link_listen,
            ca_cert,
            node_cert,
            node_key,
            replication_factor: None,
            raft_heartbeat_ms: RAFT_HEARTBEAT_MS_DEFAULT,
            raft_election_timeout_ms: RAFT_ELECTION_TIMEOUT_MS_DEFAULT,
            node_frame_bytes_max: NODE_FRAME_BYTES_MAX_DEFAULT,
            founders: None,
            members,
        }
    }

    /// The replication factor in effect: the configured one, else the default for the
    /// member count ([`default_replication_factor`]).
    pub fn replication_factor(&self) -> u32 {
        self.replication_factor
            .unwrap_or_else(|| default_replication_factor(self.members.len()))
    }

    /// The voters every group starts with: `founders`, or every member.
    pub fn founders(&self) -> std::collections::BTreeSet<u64> {
        match &self.founders {
            Some(f) => f.iter().copied().collect(),
            None => self.members.iter().map(|m| m.id).collect(),
        }
    }

    /// The member with id `id`.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The node link's settings for this section: its member set and frame limit (the other
    /// link settings at their defaults).
    pub fn link_config(&self) -> LinkConfig {
        LinkConfig {
            node_frame_bytes_max: self.node_frame_bytes_max,
            ..LinkConfig::new(self.members.iter().map(|m| m.id))
        }
    }

    /// Refuses a section that names no coherent cluster (see [`ClusterConfigError`]): a bad
    /// cluster id, a limit of 0, a node frame limit above [`NODE_FRAME_BYTES_MAX_LIMIT`], an
    /// election timeout not above the heartbeat, member ids repeated or not 1 to the member
    /// count, a link address twice, a member URL that is not http(s), a node that is not a
    /// member, a replication factor that is not 1, 3 or 5 or is above the member count.
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        use ClusterConfigError as E;
        pki::check_cluster_id(&self.id).map_err(|e| E::BadId {
            value: self.id.clone(),
            message: e.to_string(),
        })?;
        let limits = [
            ("raft_heartbeat_ms", self.raft_heartbeat_ms),
            ("raft_election_timeout_ms", self.raft_election_timeout_ms),
            ("node_frame_bytes_max", self.node_frame_bytes_max as u64),
        ];
        if let Some((key, _)) = limits.iter().find(|(_, v)| *v == 0) {
            return Err(E::Zero { key });
        }
        if self.node_frame_bytes_max > NODE_FRAME_BYTES_MAX_LIMIT {
            return Err(E::FrameAboveLimit {
                value: self.node_frame_bytes_max,
            });
        }
        if self.raft_election_timeout_ms <= self.raft_heartbeat_ms {
            return Err(E::ElectionNotAboveHeartbeat {
                election_ms: self.raft_election_timeout_ms,
                heartbeat_ms: self.raft_heartbeat_ms,
            });
        }
        let count = self.members.len();
        let mut ids = BTreeMap::new();
        let mut links = BTreeMap::new();
        for m in &self.members {
            if ids.insert(m.id, ()).is_some() {
                return Err(E::DuplicateId { id: m.id });
            }
            if m.id == 0 || m.id > NODE_ID_MAX {
                return Err(E::IdOutOfRange { id: m.id });
            }
            if let Some(first) = links.insert(m.link, m.id) {
                return Err(E::DuplicateLink {
                    link: m.link,
                    first,
                    second: m.id,
                });
            }
            if !is_http_url(&m.http) {
                return Err(E::BadHttp {
                    id: m.id,
                    value: m.http.clone(),
                });
            }
        }
        if !ids.contains_key(&self.node) {
            let listed: Vec<String> = ids.keys().map(u64::to_string).collect();
            return Err(E::NodeNotMember {
                node: self.node,
                ids: if listed.is_empty() {
                    "none".into()
                } else {
                    listed.join(", ")
                },
            });
        }
        if let Some(f) = &self.founders {
            let distinct: std::collections::BTreeSet<&u64> = f.iter().collect();
            if f.is_empty()
                || distinct.len() != f.len()
                || f.iter().any(|&i| i == 0 || i > NODE_ID_MAX)
            {
                return Err(E::BadFounders { value: f.clone() });
            }
        }
        if let Some(value) = self.replication_factor {
            if !REPLICATION_FACTORS.contains(&value) {
                return Err(E::BadReplicationFactor { value });
            }
            if value as usize > count {
                return Err(E::ReplicationAboveMembers {
                    value,
                    members: count,
                });
            }
        }
        Ok(())
    }
}

/// `http://` or `https://` and a host: what a client base URL must be.
pub(crate) fn is_http_url(s: &str) -> bool {
    match reqwest::Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        }
        Err(_) => false,
    }
}

/// A section for tests: `nodes` members on loopback ports laid out as `fabric cluster init`
/// lays them out from 7400, seen from node `node`.
#[cfg(test)]
pub(crate) fn example(nodes: u64, node: u64, id: &str) -> ClusterConfig {
    let port = |member: u64, k: u64| 7400 + 10 * (member - 1) + k;
    let members = (1..=nodes)
        .map(|m| Member {
            id: m,
            link: SocketAddr::from(([127, 0, 0, 1], port(m, 2) as u16)),
            http: format!("http://127.0.0.1:{}", port(m, 0)),
        })
        .collect();
    ClusterConfig::new(
        id.into(),
        node,
        SocketAddr::from(([127, 0, 0, 1], port(node, 2) as u16)),
        "/c/ca/ca.pem".into(),
        format!("/c/node-{node}/node-{node}.pem").into(),
        format!("/c/node-{node}/node-{node}.key").into(),
        members,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid three-node section for node 2.
    fn three() -> ClusterConfig {
        example(3, 2, "test-cluster")
    }

    fn refused(f: impl FnOnce(&mut ClusterConfig)) -> String {
        let mut c = three();
        f(&mut c);
        c.validate().expect_err("refused").to_string()
    }

    #[test]
    fn a_cluster_section_round_trips_through_toml_with_its_defaults() {
        // Proves [cluster] reads back exactly as written, a section that sets only the
        // required keys gets the documented defaults, and an unknown key is refused.
        let c = three();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: ClusterConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let set = ClusterConfig {
            replication_factor: Some(1),
            raft_heartbeat_ms: 50,
            raft_election_timeout_ms: 700,
            node_frame_bytes_max: 1 << 20,
            ..three()
        };
        let back: ClusterConfig = toml::from_str(&toml::to_string(&set).unwrap()).unwrap();
        assert_eq!(back, set);

        let minimal = r#"
            id = "c1"
            node = 1
            link_listen = "0.0.0.0:7402"
            ca_cert = "ca.pem"
            node_cert = "node-1.pem"
            node_key = "node-1.key"
            [[members]]
            id = 1
            link = "10.0.0.1:7402"
            http = "http://10.0.0.1:7400"
        "#;
        let m: ClusterConfig = toml::from_str(minimal).unwrap();
        m.validate().unwrap();
        assert_eq!(m.replication_factor, None);
        assert_eq!(m.replication_factor(), 1);
        assert_eq!(m.raft_heartbeat_ms, 100);
        assert_eq!(m.raft_election_timeout_ms, 1000);
        assert_eq!(m.node_frame_bytes_max, 4 << 20);
        assert_eq!(m.link_config().members.len(), 1);

        let typo = minimal.replace("node_key", "node_keys");
        assert!(toml::from_str::<ClusterConfig>(&typo).is_err());
        let member_typo = minimal.replace("http =", "url =");
        assert!(toml::from_str::<ClusterConfig>(&member_typo).is_err());
    }

    #[test]
    fn the_default_replication_factor_is_the_largest_of_1_3_5_within_the_members() {
        // Proves an unset replication factor follows the member count, capped at 5, and is
        // never one validate would refuse (2 members: 1; 4 members: 3).
        let expected = [(1, 1), (2, 1), (3, 3), (4, 3), (5, 5), (7, 5)];
        for (members, factor) in expected {
            assert_eq!(default_replication_factor(members), factor, "{members}");
        }
    }

    #[test]
    fn every_incoherent_section_is_refused_naming_the_key_and_value() {
        // Proves each refusal of ClusterConfig::validate, each message naming the key and the
        // value at fault.
        type Change = Box<dyn FnOnce(&mut ClusterConfig)>;
        let cases: Vec<(Change, &[&str])> = vec![
            (
                Box::new(|c| c.id = "no spaces".into()),
                &["cluster.id", "no spaces"],
            ),
            (Box::new(|c| c.id = String::new()), &["cluster.id", "\"\""]),
            (Box::new(|c| c.node = 4), &["cluster.node 4", "1, 2, 3"]),
            (Box::new(|c| c.node = 0), &["cluster.node 0"]),
            (Box::new(|c| c.members.clear()), &["cluster.node 2", "none"]),
            (
                Box::new(|c| c.members[2].id = 2),
                &["cluster.members", "id 2 twice"],
            ),
            (
                Box::new(|c| c.members[2].id = 65_536),
                &["cluster.members", "id 65536", "1 to 65535"],
            ),
            (
                Box::new(|c| c.members[0].id = 0),
                &["cluster.members", "id 0", "1 to 65535"],
            ),
            (
                Box::new(|c| c.founders = Some(vec![1, 1])),
                &["cluster.founders [1, 1]"],
            ),
            (
                Box::new(|c| c.founders = Some(vec![])),
                &["cluster.founders []"],
            ),
            (
                Box::new(|c| c.members[2].link = c.members[0].link),
                &["cluster.members", "link 127.0.0.1:7402 twice", "1 and 3"],
            ),
            (
                Box::new(|c| c.members[1].http = "127.0.0.1:7410".into()),
                &["member 2", "http", "127.0.0.1:7410"],
            ),
            (
                Box::new(|c| c.members[1].http = "ftp://h:1".into()),
                &["member 2", "ftp://h:1"],
            ),
            (
                Box::new(|c| c.replication_factor = Some(2)),
                &["cluster.replication_factor 2", "1, 3 or 5"],
            ),
            (
                Box::new(|c| c.replication_factor = Some(0)),
                &["cluster.replication_factor 0"],
            ),
            (
                Box::new(|c| c.replication_factor = Some(5)),
                &["cluster.replication_factor 5", "member count 3"],
            ),
            (
                Box::new(|c| c.raft_election_timeout_ms = 100),
                &[
                    "cluster.raft_election_timeout_ms 100",
                    "cluster.raft_heartbeat_ms 100",
                ],
            ),
            (
                Box::new(|c| c.raft_heartbeat_ms = 0),
                &["cluster.raft_heartbeat_ms is 0"],
            ),
            (
                Box::new(|c| c.raft_election_timeout_ms = 0),
                &["cluster.raft_election_timeout_ms is 0"],
            ),
            (
                Box::new(|c| c.node_frame_bytes_max = 0),
                &["cluster.node_frame_bytes_max is 0"],
            ),
            (
                Box::new(|c| c.node_frame_bytes_max = NODE_FRAME_BYTES_MAX_LIMIT + 1),
                &["cluster.node_frame_bytes_max 67108865", "limit 67108864"],
            ),
        ];
        for (change, words) in cases {
            let e = refused(change);
            for w in words {
                assert!(e.contains(w), "{e:?} lacks {w:?}");
            }
        }
        // The edges that are fine.
        let mut c = three();
        c.replication_factor = Some(3);
        c.raft_election_timeout_ms = c.raft_heartbeat_ms + 1;
        c.node_frame_bytes_max = NODE_FRAME_BYTES_MAX_LIMIT;
        c.members[0].http = "https://node1.example:443".into();
        c.validate().unwrap();
    }
}
