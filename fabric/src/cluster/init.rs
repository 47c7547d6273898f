//! `fabric cluster init`: the files of a new cluster of 1, 3 or 5 nodes on this host, in one
//! directory: a cluster CA, a certificate per node, one admin token, and a config file per node
//! that `fabric serve --config` runs.
//!
//! ```text
//! D/
//!   admin-token        0600: the cluster's admin token (also in every node's config)
//!   ca/                0700: ca.pem (0644), ca.key (0600)
//!   node-<i>/          0700: node-<i>.pem (0644), node-<i>.key (0600); data/ once the node runs
//!   node-<i>.toml      0600 (it holds the admin token): node i's config
//! ```
//!
//! Node i (from 1) listens on `127.0.0.1`, ports from `base + 10 * (i - 1)`: HTTP/WebSocket
//! on `+0`, client QUIC on `+1`, the node link on `+2`, metrics on `+3` ([`node_ports`]).
//! Every file is written temp file, fsync, rename (or link), directory fsync
//! (`crate::files`); the configs last, `node-1.toml` last of all, so a directory with a
//! `node-1.toml` holds a whole cluster.

use super::config::{ClusterConfig, Member};
use super::pki::{self, ClusterCa, PkiError};
use crate::config::{Config, ConfigError};
use crate::files::{self, FileError, MODE_SECRET};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Most nodes `init` writes.
pub const NODES_MAX: u32 = 5;
/// Default first port (node 1's HTTP/WebSocket port).
pub const BASE_PORT_DEFAULT: u16 = 7400;
/// Default shards per node.
pub const SHARDS_DEFAULT: u32 = 2;
/// Ports between one node's first port and the next node's.
pub const PORT_STRIDE: u16 = 10;
/// How long a node certificate `init` issues is valid.
pub const NODE_CERT_VALIDITY_DAYS: u32 = 365;
/// The admin token's file in the cluster directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The CA's directory in the cluster directory.
pub const CA_DIR: &str = "ca";
/// Host names every node certificate carries (the nodes run on this host).
const NODE_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

/// What to write.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Nodes, 1 to [`NODES_MAX`].
    pub nodes: u32,
    /// The cluster directory; created (0700) if missing, refused if not empty unless `force`.
    pub dir: PathBuf,
    /// Node 1's HTTP/WebSocket port; see [`node_ports`].
    pub base_port: u16,
    /// `shards` of every node.
    pub shards: u32,
    /// Write into a directory that is not empty.
    pub force: bool,
    /// The admin token; `None`: 32 random bytes, hex.
    pub admin_token: Option<String>,
}

impl InitOptions {
    /// `nodes` nodes in `dir` with the default ports and shards, a random token, no force.
    pub fn new(nodes: u32, dir: PathBuf) -> InitOptions {
        InitOptions {
            nodes,
            dir,
            base_port: BASE_PORT_DEFAULT,
            shards: SHARDS_DEFAULT,
            force: false,
            admin_token: None,
        }
    }
}

/// A node's ports on `127.0.0.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    /// HTTP and WebSocket (`listen`).
    pub http: u16,
    /// Client QUIC (`quic_listen`).
    pub quic: u16,
    /// The node link (`cluster.link_listen`).
    pub link: u16,
    /// `/metrics`, `/healthz`, `/readyz` (`metrics_listen`).
    pub metrics: u16,
}

/// Node `node`'s (from 1) ports: `base + 10 * (node - 1)`, then `+1`, `+2`, `+3`; `None` if
/// one is past 65535.
pub fn node_ports(base: u16, node: u64) -> Option<NodePorts> {
    let first = u64::from(base) + u64::from(PORT_STRIDE) * node.checked_sub(1)?;
    let port = |k: u64| u16::try_from(first + k).ok();
    Some(NodePorts {
        http: port(0)?,
        quic: port(1)?,
        link: port(2)?,
        metrics: port(3)?,
    })
}

/// A base port from which `nodes` nodes' ports ([`node_ports`]) are all free on 127.0.0.1,
/// TCP and UDP, right now (for tests and benchmarks that run a cluster beside other work):
/// tries up to 200 bases in 20000..60000, starting from one `salt` picks.
pub fn free_base_port(nodes: u32, salt: u32) -> Option<u16> {
    (0..200u32).find_map(|attempt| {
        let base = 20_000 + (salt.wrapping_add(attempt.wrapping_mul(7_919)) % 4_000) * 10;
        let base = u16::try_from(base).ok()?;
        let ports: Vec<u16> = (1..=u64::from(nodes))
            .filter_map(|n| node_ports(base, n))
            .flat_map(|p| [p.http, p.quic, p.link, p.metrics])
            .collect();
        // Held together, so no two probes take the same port.
        let held: Vec<_> = ports
            .iter()
            .map_while(|p| {
                let t = std::net::TcpListener::bind(("127.0.0.1", *p)).ok()?;
                let u = std::net::UdpSocket::bind(("127.0.0.1", *p)).ok()?;
                Some((t, u))
            })
            .collect();
        (ports.len() == 4 * nodes as usize && held.len() == ports.len()).then_some(base)
    })
}

/// `dir/node-<node>.toml`.
pub fn config_path(dir: &Path, node: u64) -> PathBuf {
    dir.join(format!("node-{node}.toml"))
}

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The cluster directory, absolute.
    pub dir: PathBuf,
    pub cluster_id: String,
    /// Every file written, in the order written.
    pub files: Vec<PathBuf>,
    /// Each node's config file, node 1 first.
    pub configs: Vec<PathBuf>,
}

impl Initialized {
    /// What `fabric cluster init` prints: the files written and the command that runs each node.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "fabric cluster init: cluster {} ({} nodes) in {}\nwrote:\n",
            self.cluster_id,
            self.configs.len(),
            self.dir.display()
        );
        for f in &self.files {
            out.push_str(&format!("  {}\n", f.display()));
        }
        out.push_str("run each node with:\n");
        for c in &self.configs {
            out.push_str(&format!("  fabric serve --config {}\n", c.display()));
        }
        out.push_str(&format!(
            "the admin token is in {}\n",
            self.dir.join(ADMIN_TOKEN_FILE).display()
        ));
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "a cluster has 1, 3 or 5 nodes (every shard has a replica on every node, and a Raft \
         group of 1, 3 or 5 voters), not {0}"
    )]
    Nodes(u32),
    #[error(
        "--base-port {base} does not fit {nodes} nodes: each node takes 4 ports, {PORT_STRIDE} \
         apart, from {base} up, all of them 1 to 65535"
    )]
    Ports { base: u16, nodes: u32 },
    #[error("{0} is not empty (--force writes into it anyway)")]
    NotEmpty(PathBuf),
    #[error(
        "{0} exists: init never replaces a cluster's CA nor gives a new node old data; remove it \
         or choose another directory"
    )]
    Exists(PathBuf),
    #[error("the admin token (FABRIC_ADMIN_TOKEN) must be non-empty and have no whitespace")]
    BadToken,
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("node {node}'s config: {source}")]
    Config { node: u64, source: Box<ConfigError> },
}

/// A new cluster id: `fabric-` and 8 random bytes in hex.
pub fn new_cluster_id() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    format!("fabric-{}", hex::encode(b))
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// The checks that need no file: node count, ports, token.
fn check_options(o: &InitOptions) -> Result<(), InitError> {
    if ![1, 3, 5].contains(&o.nodes) {
        return Err(InitError::Nodes(o.nodes));
    }
    if o.base_port == 0 || node_ports(o.base_port, u64::from(o.nodes)).is_none() {
        return Err(InitError::Ports {
            base: o.base_port,
            nodes: o.nodes,
        });
    }
    if let Some(t) = &o.admin_token {
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InitError::BadToken);
        }
    }
    Ok(())
}

/// Node `node`'s configuration in the cluster directory `dir` (absolute).
fn node_config(
    o: &InitOptions,
    dir: &Path,
    cluster_id: &str,
    node: u64,
    token: &str,
) -> Result<Config, InitError> {
    let ports = |i: u64| {
        node_ports(o.base_port, i).ok_or(InitError::Ports {
            base: o.base_port,
            nodes: o.nodes,
        })
    };
    let mut members = Vec::new();
    for id in 1..=u64::from(o.nodes) {
        let p = ports(id)?;
        members.push(Member {
            id,
            link: localhost(p.link),
            http: format!("http://{}", localhost(p.http)),
        });
    }
    let own = ports(node)?;
    let node_dir = dir.join(format!("node-{node}"));
    let (node_cert, node_key) = pki::node_files(&node_dir, node);
    let mut cluster = ClusterConfig::new(
        cluster_id.to_string(),
        node,
        localhost(own.link),
        dir.join(CA_DIR).join(pki::CA_CERT_FILE),
        node_cert,
        node_key,
        members,
    );
    cluster.replication_factor = Some(cluster.replication_factor());
    let config = Config {
        data_dir: node_dir.join("data"),
        listen: localhost(own.http),
        quic_listen: Some(localhost(own.quic)),
        metrics_listen: Some(localhost(own.metrics)),
        shards: o.shards,
        admin_token: Some(token.to_string()),
        cluster: Some(cluster),
        ..Config::default()
    };
    config.validate().map_err(|source| InitError::Config {
        node,
        source: Box::new(source),
    })?;
    Ok(config)
}

/// The keys of a node's config `init` writes; every other key keeps its default.
const WRITTEN_KEYS: [&str; 7] = [
    "data_dir",
    "listen",
    "quic_listen",
    "metrics_listen",
    "shards",
    "admin_token",
    "cluster",
];

/// `config` as the TOML file `init` writes: a header, then [`WRITTEN_KEYS`].
fn config_text(config: &Config, node: u64, nodes: u32, path: &Path) -> String {
    let mut table = match toml::Value::try_from(config) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    table.retain(|k, _| WRITTEN_KEYS.contains(&k));
    let id = config.cluster.as_ref().map_or("", |c| c.id.as_str());
    format!(
        "# Node {node} of the {nodes}-node cluster {id}, written by `fabric cluster init`.\n\
         # Run it with: fabric serve --config {}\n\
         # It holds the cluster's admin token: keep it private. Every key not set here has its\n\
         # default (docs/OPERATIONS.md).\n\n{}",
        path.display(),
        toml::to_string(&table).unwrap_or_default()
    )
}

/// Writes a new cluster's files into `o.dir` (see the module docs), creating it (0700) if
/// missing. Refuses, before writing anything, a node count other than 1, 3 or 5, ports past 65535, a directory that is not empty
/// (unless `o.force`), and even with `o.force` an existing CA or node data directory.
pub fn init(o: &InitOptions) -> Result<Initialized, InitError> {
    check_options(o)?;
    match std::fs::read_dir(&o.dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !o.force {
                return Err(InitError::NotEmpty(o.dir.clone()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InitError::Io {
                what: "read directory",
                path: o.dir.clone(),
                source,
            })
        }
    }
    let dir = std::path::absolute(&o.dir).map_err(|source| InitError::Io {
        what: "resolve",
        path: o.dir.clone(),
        source,
    })?;
    let ca_dir = dir.join(CA_DIR);
    let mut taken = vec![
        ca_dir.join(pki::CA_CERT_FILE),
        ca_dir.join(pki::CA_KEY_FILE),
    ];
    taken.extend((1..=u64::from(o.nodes)).map(|i| dir.join(format!("node-{i}")).join("data")));
    if let Some(t) = taken.into_iter().find(|p| p.exists()) {
        return Err(InitError::Exists(t));
    }
    let token = o.admin_token.clone().unwrap_or_else(crate::node::new_token);
    let cluster_id = new_cluster_id();
    let nodes = u64::from(o.nodes);
    // Every config is built (and validated) before the first file is written.
    let configs = (1..=nodes)
        .map(|i| node_config(o, &dir, &cluster_id, i, &token))
        .collect::<Result<Vec<_>, _>>()?;

    files::create_dir_private(&dir)?;
    let mut written = Vec::new();
    let ca = ClusterCa::generate(&cluster_id)?;
    let (ca_cert, ca_key) = ca.save(&ca_dir)?;
    written.extend([ca_key, ca_cert]);
    let hosts: Vec<String> = NODE_HOSTS.iter().map(|h| h.to_string()).collect();
    for i in 1..=nodes {
        let cert = ca.issue_node(i, &hosts, NODE_CERT_VALIDITY_DAYS)?;
        let (cert_path, key_path) = cert.save(&dir.join(format!("node-{i}")))?;
        written.extend([key_path, cert_path]);
    }
    let token_path = dir.join(ADMIN_TOKEN_FILE);
    files::write_atomic(&token_path, token.as_bytes(), MODE_SECRET)?;
    written.push(token_path);
    for (i, config) in configs.iter().enumerate().rev() {
        let node = i as u64 + 1;
        let path = config_path(&dir, node);
        let text = config_text(config, node, o.nodes, &path);
        files::write_atomic(&path, text.as_bytes(), MODE_SECRET)?;
        written.push(path);
    }
    Ok(Initialized {
        configs: (1..=nodes).map(|i| config_path(&dir, i)).collect(),
        dir,
        cluster_id,
        files: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Verifies that `cert` chains to the CA certificate `ca` (the node link's check).
    fn chains_to(
        cert: &rustls::pki_types::CertificateDer<'static>,
        ca: &rustls::pki_types::CertificateDer<'static>,
    ) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(cert).unwrap();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            algs.all,
        )
        .is_ok()
    }

    #[test]
    fn init_writes_a_cluster_whose_configs_load_validate_and_trust_one_ca() {
        // Proves `cluster init` writes, for 3 nodes, configs that load and validate with the
        // documented ports and distinct data dirs, one 0600 admin token they all carry, and
        // node certificates for the right cluster and node that chain to the written CA.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let mut o = InitOptions::new(3, dir.clone());
        o.base_port = 17400;
        o.shards = 3;
        o.admin_token = Some("tok-123".into());
        let done = init(&o).unwrap();
        assert_eq!(done.dir, dir);
        assert_eq!(mode_of(&dir), 0o700);
        let token_path = dir.join("admin-token");
        assert_eq!(std::fs::read_to_string(&token_path).unwrap(), "tok-123");
        assert_eq!(mode_of(&token_path), 0o600);
        let ca_cert = pki::load_ca_cert(&dir.join("ca/ca.pem")).unwrap();
        let ca = ClusterCa::load_dir(&dir.join("ca")).unwrap();
        assert_eq!(ca.cluster_id(), done.cluster_id);
        assert_eq!(mode_of(&dir.join("ca/ca.key")), 0o600);

        let mut data_dirs = std::collections::BTreeSet::new();
        for i in 1..=3u64 {
            let path = dir.join(format!("node-{i}.toml"));
            assert_eq!(done.configs[i as usize - 1], path);
            assert_eq!(mode_of(&path), 0o600, "the config holds the token");
            let c = Config::from_toml_file(&path).unwrap();
            c.validate().unwrap();
            let base = 17400 + 10 * (i as u16 - 1);
            assert_eq!(c.listen, localhost(base));
            assert_eq!(c.quic_listen, Some(localhost(base + 1)));
            assert_eq!(c.metrics_listen, Some(localhost(base + 3)));
            assert_eq!(c.shards, 3);
            assert_eq!(c.admin_token.as_deref(), Some("tok-123"));
            assert_eq!(c.data_dir, dir.join(format!("node-{i}/data")));
            assert!(data_dirs.insert(c.data_dir.clone()));
            let cl = c.cluster.expect("a cluster section");
            assert_eq!((cl.id.as_str(), cl.node), (done.cluster_id.as_str(), i));
            assert_eq!(cl.link_listen, localhost(base + 2));
            assert_eq!(cl.replication_factor, Some(3));
            assert_eq!(cl.members.len(), 3);
            for m in &cl.members {
                let p = node_ports(17400, m.id).unwrap();
                assert_eq!(m.link, localhost(p.link));
                assert_eq!(m.http, format!("http://127.0.0.1:{}", p.http));
            }
            assert_eq!(cl.ca_cert, dir.join("ca/ca.pem"));
            let id = pki::NodeIdentity::load(&cl.node_cert, &cl.node_key).unwrap();
            assert_eq!((id.cluster_id.as_str(), id.node_id), (ca.cluster_id(), i));
            assert!(chains_to(&id.chain[0], &ca_cert), "node {i}");
            assert_eq!(mode_of(&cl.node_key), 0o600);
        }
        // Every file init reports is there; no temp file is left.
        for f in &done.files {
            assert!(f.is_file(), "{}", f.display());
        }
        assert_eq!(done.files.last(), Some(&dir.join("node-1.toml")));
        let summary = done.summary();
        assert!(summary.contains(&format!(
            "fabric serve --config {}",
            dir.join("node-2.toml").display()
        )));
    }

    #[test]
    fn init_refuses_a_non_empty_dir_a_bad_node_count_and_an_existing_ca() {
        // Proves init refuses, writing nothing, a directory that is not empty (naming it),
        // node counts outside 1..=5, ports past 65535 and a bad token; and that --force writes
        // into a directory with other files but never over an existing cluster's CA.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let mut o = InitOptions::new(1, dir.clone());
        let e = init(&o).unwrap_err();
        assert!(matches!(e, InitError::NotEmpty(_)), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "nothing written"
        );

        for n in [0, 2, 4, 6] {
            let e = init(&InitOptions::new(n, tmp.path().join("n"))).unwrap_err();
            assert!(e.to_string().contains(&format!("voters), not {n}")), "{e}");
        }
        assert!(!tmp.path().join("n").exists());
        let mut high = InitOptions::new(5, tmp.path().join("p"));
        high.base_port = 65500;
        assert!(matches!(init(&high), Err(InitError::Ports { .. })));
        high.base_port = 0;
        assert!(matches!(init(&high), Err(InitError::Ports { .. })));
        let mut token = InitOptions::new(1, tmp.path().join("t"));
        token.admin_token = Some("two words".into());
        assert!(matches!(init(&token), Err(InitError::BadToken)));
        let mut shards = InitOptions::new(1, tmp.path().join("s"));
        shards.shards = 0;
        let e = init(&shards).unwrap_err().to_string();
        assert!(e.contains("shards"), "{e}");
        assert!(!tmp.path().join("s").exists(), "nothing written");

        o.force = true;
        o.base_port = 17500;
        let first = init(&o).unwrap();
        assert!(dir.join("notes.txt").exists());
        let e = init(&o).unwrap_err();
        assert!(
            matches!(&e, InitError::Exists(p) if p.ends_with("ca/ca.pem")),
            "{e}"
        );
        // The first cluster is intact.
        let c = Config::from_toml_file(&first.configs[0]).unwrap();
        assert_eq!(c.cluster.unwrap().id, first.cluster_id);
    }

    #[test]
    fn node_ports_follow_the_documented_layout() {
        // Proves node i's ports are base + 10(i-1) and the next three, and none past 65535.
        let p = node_ports(7400, 3).unwrap();
        assert_eq!(
            p,
            NodePorts {
                http: 7420,
                quic: 7421,
                link: 7422,
                metrics: 7423
            }
        );
        assert_eq!(node_ports(65532, 1).map(|p| p.metrics), Some(65535));
        assert_eq!(node_ports(65533, 1), None);
        assert_eq!(node_ports(7400, 0), None);
    }
}
