//! Assembles a node: data dir and metadata, admin token, shard actors under a supervisor, and
//! the HTTP/WebSocket server. Also graceful shutdown.

use crate::config::Config;
use crate::files;
use crate::metrics::raft::{ClusterLabels, ClusterScrape};
use crate::metrics::Metrics;
use crate::shard_actor::{
    NodeSupervisor, ShardMsg, ShardSlot, SlotSettings, SupervisorArgs, SupervisorMsg,
};
use fabric_edge::SessionConfig;
use fabric_router::{PlacementMeta, Router};
use ractor::{Actor, ActorRef};
use rand::RngCore;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Format of the node metadata file; bump on incompatible changes.
const META_FORMAT_VERSION: u32 = 1;
const META_FILE: &str = "node.json";
const ADMIN_TOKEN_FILE: &str = "admin-token";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The `[cluster]` section names files or a node link that cannot be used.
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("node metadata {path} is not valid: {message}")]
    Meta {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Placement(#[from] fabric_router::RouterError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("shard actors did not start: {0}")]
    Actors(String),
    #[error("shard {shard} refused to recover: {source}")]
    Recovery {
        shard: u32,
        source: crate::shard_actor::RecoveryRefused,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Quic(#[from] crate::quic::QuicError),
    #[error(transparent)]
    File(#[from] crate::files::FileError),
}

/// What every session and HTTP handler shares.
pub struct NodeCtx {
    pub config: Config,
    pub admin_token: String,
    pub shards: Vec<mpsc::Sender<ShardMsg>>,
    pub slots: Vec<Arc<ShardSlot>>,
    pub session_config: SessionConfig,
    pub shutdown: watch::Receiver<bool>,
    pub sessions_open: AtomicU64,
    router: Router,
    next_session: AtomicU64,
    /// This node's name in log spans (its listen address).
    pub node_name: Arc<str>,
    /// This node's metric handles (no-ops when `metrics = false`).
    pub metrics: Arc<Metrics>,
    /// Client connections open (HTTP/WebSocket port and QUIC), against `connections_max` and
    /// `connections_per_ip_max`.
    pub connections: Arc<crate::listener::ConnLimiter>,
    /// QUIC refusals being answered at once.
    pub(crate) quic_refusals: Arc<tokio::sync::Semaphore>,
    /// Set when this node is a member of a replicated cluster.
    pub cluster: Option<ClusterCtx>,
}

/// A cluster member's own: its `[cluster]` section and its node link.
pub struct ClusterCtx {
    pub config: crate::cluster::config::ClusterConfig,
    pub links: Arc<crate::cluster::runtime::LinkSender>,
    /// The metadata group's replica on this node (`crate::cluster::directory`): its input,
    /// and its slot (what `/v1/cluster` reports as `meta`).
    pub meta: mpsc::Sender<ShardMsg>,
    pub meta_slot: Arc<ShardSlot>,
    /// The cluster's members as this node last read them from the metadata group; their
    /// client URLs in id order once read (what `welcome` names); one refresh at a time.
    pub directory: std::sync::Mutex<crate::cluster::directory::Directory>,
    pub welcome: std::sync::RwLock<Option<Arc<[Arc<str>]>>>,
    pub refreshing: tokio::sync::Mutex<()>,
    /// Routes frames that arrive to their shards (ends with the link).
    _router: tokio::task::JoinHandle<()>,
}

/// Why a node is or is not ready to serve writes (`/readyz`, `fabric_ready`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub shards: Vec<ShardReadiness>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardReadiness {
    pub shard: u32,
    /// Recovered, its WAL writable, serving.
    pub ready: bool,
    pub restarts: u64,
    /// The last storage or recovery failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A WAL write (fdatasync) has been in flight longer than `wal_sync_stall_ms_max`.
    pub wal_stalled: bool,
    /// The last write failed for lack of space and none has landed since: writes are refused
    /// with `storage_full` and retried after a backoff (reads are served).
    pub storage_full: bool,
    /// The replica is in repair: its log was damaged where no torn write can be, it cut the
    /// log there and fetches the rest from the leader; it must hold entries through this index
    /// before it votes again. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair_through: Option<u64>,
}

impl NodeCtx {
    /// A new session's id; in a cluster it carries this node's id (the leader of a shard on
    /// another node addresses its replies by it).
    pub fn next_session_id(&self) -> u64 {
        let k = self.next_session.fetch_add(1, Ordering::Relaxed);
        match &self.cluster {
            Some(c) => fabric_router::host::session_id(c.config.node, k),
            None => k,
        }
    }

    /// What a new session's `welcome` names as `nodes` in a cluster: the members' client URLs
    /// in id order, as this node last read them from the metadata group (`None` before its
    /// first read, or outside a cluster: the config's members then).
    pub fn welcome_nodes(&self) -> Option<Arc<[Arc<str>]>> {
        self.cluster.as_ref()?.welcome.read().ok()?.clone()
    }

    /// A router for one session (it owns that session's per-shard batches).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Capacity of a session's reply channel (the rule is `Limits::session_reply_queue_max`).
    pub fn session_queue_max(&self) -> usize {
        self.config.session_reply_queue_max()
    }

    /// Ready when every shard has recovered and serves writes (its WAL has not failed) and the
    /// node is not shutting down.
    pub fn readiness(&self) -> Readiness {
        let shards: Vec<ShardReadiness> = self
            .slots
            .iter()
            .map(|s| {
                let (last_error, stalled, storage_full, replica) = s
                    .stats
                    .lock()
                    .map(|st| {
                        let r = st.replica.clone();
                        (st.last_error.clone(), st.wal_stalled, st.disk_full, r)
                    })
                    .unwrap_or_default();
                // A replica serves (directly or through its leader) once a leader is known, and
                // counts as ready only once out of repair.
                let repair_through = replica.as_ref().and_then(|r| r.repair_through);
                let led = s.replication.is_none()
                    || replica.is_some_and(|r| r.leader.is_some() && r.repair_through.is_none());
                ShardReadiness {
                    shard: s.idx,
                    ready: s.ready.load(Ordering::SeqCst) && led && !stalled && !storage_full,
                    repair_through,
                    restarts: s.restarts.load(Ordering::SeqCst),
                    last_error,
                    wal_stalled: stalled,
                    storage_full,
                }
            })
            .collect();
        let down: Vec<u32> = shards
            .iter()
            .filter(|s| !s.ready)
            .map(|s| s.shard)
            .collect();
        let removed_by = self.cluster.as_ref().and_then(|c| c.links.removed_by());
        let reason = if *self.shutdown.borrow() {
            Some("the node is shutting down".to_string())
        } else if let Some(by) = removed_by {
            Some(format!(
                "this node was removed from the cluster (node {by} applied the change and closed \
                 its link); it serves nothing: stop it"
            ))
        } else if let Some(r) = shards.iter().find(|s| s.repair_through.is_some()) {
            Some(format!(
                "shard {} is in repair: its log was damaged, it fetches entries through lsn {} \
                 from the leader (not serving: {down:?})",
                r.shard,
                r.repair_through.unwrap_or(0)
            ))
        } else if !down.is_empty() {
            Some(format!(
                "shards not serving writes (recovering, restarting, failed, disk full, a WAL \
                 sync stalled, or no leader known): {down:?}"
            ))
        } else {
            None
        };
        Readiness {
            ready: reason.is_none(),
            reason,
            shards,
        }
    }

    /// What `/v1/cluster` answers: every member (its client URL, whether this node's link to
    /// it is up) and every shard's group as this node's replica sees it (`leader` null when
    /// it knows none; `lag` only on the leader: entries each follower is behind its log).
    pub fn cluster_view(&self) -> Option<serde_json::Value> {
        let c = self.cluster.as_ref()?;
        let up: std::collections::BTreeMap<u64, bool> =
            c.links.status().iter().map(|p| (p.id, p.up)).collect();
        let dir = c.directory.lock().map(|d| d.clone()).unwrap_or_default();
        let nodes: Vec<serde_json::Value> = dir
            .nodes
            .iter()
            .map(|(id, m)| {
                let up = *id == c.config.node || up.get(id).copied().unwrap_or(false);
                let http = m.as_ref().map(|m| m.http.clone());
                let link = m.as_ref().map(|m| m.link.to_string());
                serde_json::json!({"id": id, "http": http, "link": link, "up": up})
            })
            .collect();
        let group = |s: &Arc<ShardSlot>| {
            let r = s
                .stats
                .lock()
                .ok()
                .and_then(|st| st.replica.clone())
                .unwrap_or_default();
            let lag: serde_json::Map<String, serde_json::Value> = r
                .matched
                .iter()
                .filter(|_| r.leader == Some(r.node))
                .map(|(id, m)| (id.to_string(), r.last_index.saturating_sub(*m).into()))
                .collect();
            serde_json::json!({
                "shard": s.idx, "leader": r.leader, "term": r.term, "commit": r.commit,
                "members": r.voters, "learners": r.learners, "lag": lag,
            })
        };
        let shards: Vec<serde_json::Value> = self.slots.iter().map(group).collect();
        let mut meta = group(&c.meta_slot);
        if let Some(m) = meta.as_object_mut() {
            m.remove("shard");
            m.insert("changes".into(), dir.seq.into());
        }
        Some(serde_json::json!({
            "node": c.config.node, "nodes": nodes, "shards": shards, "meta": meta,
        }))
    }

    /// `GET /metrics`: the Prometheus text, or `None` when metrics are off.
    pub fn render_metrics(&self) -> Option<String> {
        if !self.metrics.enabled() {
            return None;
        }
        let r = self.readiness();
        let shards: Vec<(bool, u64)> = r.shards.iter().map(|s| (s.ready, s.restarts)).collect();
        self.metrics
            .render(r.ready, &shards, self.cluster_scrape().as_ref())
    }

    /// A clustered node's figures for a scrape: each shard's replica view as its host last
    /// published it (what `/v1/cluster` answers with), and the node link's view of each peer.
    fn cluster_scrape(&self) -> Option<ClusterScrape> {
        let c = self.cluster.as_ref()?;
        let replicas = self
            .slots
            .iter()
            .map(|s| s.stats.lock().ok().and_then(|st| st.replica.clone()))
            .collect();
        Some(ClusterScrape {
            replicas,
            links: c.links.status(),
        })
    }
}

pub struct RunningNode {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    quic_addr: Option<SocketAddr>,
    tls_fingerprint: Option<[u8; 32]>,
    ctx: Arc<NodeCtx>,
    shutdown_tx: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    supervisor: ActorRef<SupervisorMsg>,
}

impl RunningNode {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The separate metrics address (`metrics_listen`), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The QUIC (UDP) address, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// SHA-256 of the node's TLS certificate (what QUIC clients pin), when QUIC is on.
    pub fn tls_fingerprint(&self) -> Option<[u8; 32]> {
        self.tls_fingerprint
    }

    pub fn admin_token(&self) -> &str {
        &self.ctx.admin_token
    }

    pub fn ctx(&self) -> &Arc<NodeCtx> {
        &self.ctx
    }

    /// Chaos drill: fail one shard; its supervisor restarts it and it recovers from its WAL.
    pub fn crash_shard(&self, shard: u32) {
        let _ = self.supervisor.cast(SupervisorMsg::Crash(shard));
    }

    /// Stops accepting, lets sessions finish their in-flight requests, then has every shard
    /// write and sync what it took in before stopping.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.shutdown_tx.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.server).await;
        // Upgraded WebSocket sessions outlive the HTTP server; each drains its in-flight
        // requests (bounded by its own deadline) and closes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.ctx.sessions_open.load(Ordering::Relaxed) > 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (tx, rx) = oneshot::channel();
        if self.supervisor.cast(SupervisorMsg::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
        self.supervisor.stop(None);
        tracing::info!("stopped");
    }
}

/// A fresh random token: 32 bytes from the OS RNG, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks (or, on a new data dir, records) the placement the data was written with.
fn check_meta(config: &Config, router: &Router) -> Result<(), NodeError> {
    let path = config.data_dir.join(META_FILE);
    let ours = router.meta();
    match std::fs::read(&path) {
        Ok(bytes) => {
            #[derive(serde::Deserialize)]
            struct Stored {
                format_version: u32,
                placement: PlacementMeta,
            }
            let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| NodeError::Meta {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if stored.format_version != META_FORMAT_VERSION {
                return Err(NodeError::Meta {
                    path,
                    message: format!(
                        "format version {} is not {META_FORMAT_VERSION}",
                        stored.format_version
                    ),
                });
            }
            ours.check(&stored.placement)?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let json = serde_json::json!({
                "format_version": META_FORMAT_VERSION,
                "placement": ours,
            });
            crate::files::write_atomic(&path, json.to_string().as_bytes(), files::MODE_PUBLIC)?;
            Ok(())
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

fn admin_token(config: &Config) -> Result<String, NodeError> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {
            // Only a file written before tokens were written atomically can be empty (a power
            // loss right after the first start): nobody can hold that token, so make a new one.
            tracing::warn!(file = %path.display(), "the stored admin token is empty; generating a new one");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &path)(e)),
    }
    let token = new_token();
    // Mode 0600 from creation on: the secret is never readable by others, not even briefly.
    files::write_atomic(&path, token.as_bytes(), files::MODE_SECRET)?;
    // Printed once, on the start that made it; afterwards it is in the data dir.
    crate::logging::say(format_args!(
        "fabric: generated admin token {token} (stored in {})",
        path.display()
    ));
    Ok(token)
}

/// Starts a node and returns once it is listening and every shard has recovered.
pub async fn start(config: Config) -> Result<RunningNode, NodeError> {
    config.validate()?;
    let router = Router::new(config.partitions, config.shards)?;
    prepare_data_dir(&config, &router)?;
    let admin_token = admin_token(&config)?;
    let (listener, addr) = bind(config.listen).await?;
    let metrics_listener = match config.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    // Log lines of this node carry its address as `node`.
    let node_name: Arc<str> = addr.to_string().into();
    let cluster_labels = config.cluster.as_ref().map(|c| ClusterLabels {
        node: c.node,
        peers: c
            .members
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != c.node)
            .collect(),
    });
    let metrics = Arc::new(Metrics::with_cluster(
        config.metrics,
        config.shards,
        &config.metrics_meshes,
        cluster_labels.as_ref(),
    )?);
    let links = match &config.cluster {
        Some(c) => Some(start_links(c).await?),
        None => None,
    };
    let (slots, senders, supervisor, cluster) =
        start_shards(&config, &node_name, &metrics, links).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let config_caps = (config.connections_max, config.connections_per_ip_max);
    let session_config = config.session_config();
    let first_session = match &config.cluster {
        Some(_) => fabric_router::host::session_counter_start(crate::now_ms()),
        None => 1,
    };
    let ctx = Arc::new(NodeCtx {
        config,
        admin_token,
        shards: senders,
        slots,
        session_config,
        shutdown: shutdown_rx.clone(),
        sessions_open: AtomicU64::new(0),
        router,
        // A single node's sessions count from 1; a clustered node's from its boot time, so a
        // restart never reuses an id a leader elsewhere may still hold.
        next_session: AtomicU64::new(first_session),
        node_name,
        metrics,
        connections: crate::listener::ConnLimiter::new(config_caps.0, config_caps.1),
        quic_refusals: crate::listener::refusal_slots(),
        cluster,
    });
    let tls = start_tls_and_quic(&ctx, addr, &shutdown_rx)?;
    let header_timeout = std::time::Duration::from_millis(ctx.config.http_header_timeout_ms);
    let metrics_addr = metrics_listener
        .map(|(listener, local)| serve_metrics_port(&ctx, listener, local, &shutdown_rx));
    spawn_metrics_upkeep(&ctx, &shutdown_rx);
    if ctx.cluster.is_some() {
        crate::cluster::directory::spawn_watcher(ctx.clone());
    }
    // Nagle is off on every accepted connection (listener.rs): a session writes whole
    // batches and flushes once, and Nagle would hold a second small write (a welcome after an
    // options `ok`, an answer after a push) until the client's delayed ACK, up to 40 ms later.
    let port = crate::listener::HttpPort::new(
        crate::http::routes(ctx.clone()),
        ctx.connections.clone(),
        tls.https,
        header_timeout,
        ctx.metrics.clone(),
        |m| &m.http_port,
    );
    let server = tokio::spawn(crate::listener::serve(listener, port, shutdown_rx));
    tracing::info!(%addr, shards = ctx.shards.len(), metrics = ?metrics_addr, "listening");
    Ok(RunningNode {
        addr,
        metrics_addr,
        quic_addr: tls.quic_addr,
        tls_fingerprint: tls.fingerprint,
        ctx,
        shutdown_tx,
        server,
        supervisor,
    })
}

/// The data dir (0700: it holds the admin token and every tenant's messages; its entry and
/// any parent made with it fsynced, so files written into it next survive a power loss), each
/// shard's directory and manifest on a new one, and the placement check.
fn prepare_data_dir(config: &Config, router: &Router) -> Result<(), NodeError> {
    files::create_dir_private(&config.data_dir)?;
    // A new data directory gets every shard's directory and manifest before its placement is
    // recorded: afterwards a shard directory without a manifest means it was emptied.
    if !config.data_dir.join(META_FILE).exists() {
        crate::storage::init_shard_dirs(&config.data_dir, config.shards).map_err(|e| {
            NodeError::Meta {
                path: config.data_dir.clone(),
                message: e.to_string(),
            }
        })?;
    }
    check_meta(config, router)
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), NodeError> {
    let listen = |source| NodeError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let local = listener.local_addr().map_err(listen)?;
    Ok((listener, local))
}

type Shards = (
    Vec<Arc<ShardSlot>>,
    Vec<mpsc::Sender<ShardMsg>>,
    ActorRef<SupervisorMsg>,
    Option<ClusterCtx>,
);

type Links = (
    crate::cluster::config::ClusterConfig,
    Arc<crate::cluster::runtime::LinkSender>,
    mpsc::Receiver<crate::cluster::Inbound<fabric_router::host::NodeFrame>>,
);

/// Loads this node's certificate and the cluster CA, binds the node link and starts dialing
/// every member.
async fn start_links(c: &crate::cluster::config::ClusterConfig) -> Result<Links, NodeError> {
    use crate::cluster::{pki, runtime};
    let cluster = |message: String| NodeError::Cluster(message);
    // A node that joined later (founders set) lists the members it knew when it joined.
    if c.founders.is_none() && c.replication_factor() as usize != c.members.len() {
        return Err(cluster(format!(
            "cluster.replication_factor {} is below the member count {}: placing shards on \
             some members only needs the cluster's metadata group, which this version does not \
             have; list as many members as the replication factor",
            c.replication_factor(),
            c.members.len()
        )));
    }
    let identity = pki::NodeIdentity::load(&c.node_cert, &c.node_key)
        .map_err(|e| cluster(format!("{}: {e}", c.node_cert.display())))?;
    if identity.node_id != c.node || identity.cluster_id != c.id {
        return Err(cluster(format!(
            "{} is node {} of cluster {}, but the config says node {} of cluster {}",
            c.node_cert.display(),
            identity.node_id,
            identity.cluster_id,
            c.node,
            c.id
        )));
    }
    let ca_cert = pki::load_ca_cert(&c.ca_cert)
        .map_err(|e| cluster(format!("{}: {e}", c.ca_cert.display())))?;
    let setup = runtime::LinkSetup {
        identity,
        ca_cert,
        listen: c.link_listen,
        members: c.members.iter().map(|m| (m.id, m.link)).collect(),
        node_frame_bytes_max: c.node_frame_bytes_max,
    };
    let (links, inbound) = runtime::start_links(setup)
        .await
        .map_err(|e| cluster(format!("node link on {}: {e}", c.link_listen)))?;
    Ok((c.clone(), links, inbound))
}

/// Shard `i`'s replication in cluster `c`: a replica in every member.
fn slot_replication(
    c: &crate::cluster::config::ClusterConfig,
    links: &Arc<crate::cluster::runtime::LinkSender>,
) -> (
    crate::shard_actor::SlotReplication,
    mpsc::Sender<(u64, fabric_router::host::NodeFrame)>,
) {
    let config = fabric_shard::replica::ReplicaConfig {
        node: c.node,
        voters: c.founders(),
        raft: fabric_shard::raft::RaftConfig {
            raft_heartbeat_ms: c.raft_heartbeat_ms,
            raft_election_timeout_ms: c.raft_election_timeout_ms,
            ..fabric_shard::raft::RaftConfig::default()
        },
        planted: Default::default(),
    };
    let sender: Arc<dyn crate::shard_actor::NodeSender> = links.clone();
    crate::shard_actor::SlotReplication::new(config, sender)
}

/// Every shard's slot under the supervisor, each recovered: one that refuses (corruption, a
/// missing segment) keeps the node from starting, naming what it refused.
async fn start_shards(
    config: &Config,
    node_name: &Arc<str>,
    metrics: &Arc<Metrics>,
    links: Option<Links>,
) -> Result<Shards, NodeError> {
    let limits = config.limits();
    let (mut slots, mut senders, mut inbound) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..config.shards {
        let replication = links.as_ref().map(|(c, l, _)| {
            let (r, tx) = slot_replication(c, l);
            inbound.push(tx);
            r
        });
        let dir = crate::storage::shard_dir(&config.data_dir, i);
        let shard_config = limits.shard_config(i);
        let settings = slot_settings(config, node_name, metrics, (i, dir, shard_config));
        let (slot, tx) = ShardSlot::new(SlotSettings {
            replication,
            ..settings
        });
        slots.push(slot);
        senders.push(tx);
    }
    let meta = match &links {
        Some((c, l, _)) => {
            let (r, tx) = slot_replication(c, l);
            inbound.push(tx);
            Some(meta_slot(config, node_name, metrics, r)?)
        }
        None => None,
    };
    let mut all_slots = slots.clone();
    let mut all_senders = senders.clone();
    if let Some((slot, tx)) = &meta {
        all_slots.push(slot.clone());
        all_senders.push(tx.clone());
    }
    let args = SupervisorArgs {
        slots: all_slots.clone(),
        senders: all_senders,
    };
    let (supervisor, _) = Actor::spawn(None, NodeSupervisor, args)
        .await
        .map_err(|e| NodeError::Actors(e.to_string()))?;
    for (i, slot) in all_slots.iter().enumerate() {
        if let Err(source) = slot.wait_recovered().await {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if supervisor.cast(SupervisorMsg::Stop(tx)).is_ok() {
                let _ = rx.await;
            }
            supervisor.stop(None);
            return Err(NodeError::Recovery {
                shard: i as u32,
                source,
            });
        }
    }
    let cluster = links
        .zip(meta)
        .map(|((config, links, rx), (meta_slot, meta))| ClusterCtx {
            directory: std::sync::Mutex::new(crate::cluster::directory::Directory::founded(
                &config,
            )),
            welcome: std::sync::RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            config,
            links,
            meta,
            meta_slot,
            _router: crate::cluster::runtime::route_inbound(rx, inbound),
        });
    Ok((slots, senders, supervisor, cluster))
}

/// The metadata group's slot: group `shards` (after the data shards) in `data_dir/meta`, its
/// log never retired (it holds a few hundred bytes per membership change and per election).
fn meta_slot(
    config: &Config,
    node_name: &Arc<str>,
    metrics: &Arc<Metrics>,
    replication: crate::shard_actor::SlotReplication,
) -> Result<(Arc<ShardSlot>, mpsc::Sender<ShardMsg>), NodeError> {
    let limits = config.limits();
    let idx = config.shards;
    let dir = config.data_dir.join(crate::cluster::directory::META_DIR);
    crate::storage::init_shard_dir(&dir, idx).map_err(|e| NodeError::Meta {
        path: dir.clone(),
        message: e.to_string(),
    })?;
    let mut shard_config = limits.shard_config(idx);
    shard_config.retention_bytes_max = crate::cluster::directory::META_RETENTION_BYTES_MAX;
    let settings = slot_settings(config, node_name, metrics, (idx, dir, shard_config));
    Ok(ShardSlot::new(SlotSettings {
        replication: Some(replication),
        ..settings
    }))
}

/// A slot's settings from the node's config: group `idx` in `dir` with `shard_config`, no
/// replication (the caller sets it).
fn slot_settings(
    config: &Config,
    node_name: &Arc<str>,
    metrics: &Arc<Metrics>,
    (idx, dir, shard_config): (u32, std::path::PathBuf, fabric_shard::ShardConfig),
) -> SlotSettings {
    let limits = config.limits();
    SlotSettings {
        idx,
        dir,
        config: shard_config,
        durability: config.durability,
        queue_batches_max: config.shard_queue_batches_max,
        node: node_name.clone(),
        metrics: metrics.clone(),
        policy: limits.restart_policy(),
        wal_sync_stall_ms_max: config.wal_sync_stall_ms_max,
        replication: None,
    }
}

/// What the node's certificate serves: QUIC's address, HTTPS on the HTTP port.
struct TlsSides {
    fingerprint: Option<[u8; 32]>,
    quic_addr: Option<SocketAddr>,
    https: Option<crate::listener::TlsSide>,
}

/// One certificate for QUIC and, when on, HTTPS/wss on the HTTP port.
fn start_tls_and_quic(
    ctx: &Arc<NodeCtx>,
    addr: SocketAddr,
    shutdown: &watch::Receiver<bool>,
) -> Result<TlsSides, NodeError> {
    let identity = if ctx.config.quic || ctx.config.ws_tls {
        Some(crate::tls::load_or_generate(
            ctx.config.tls_cert.as_deref(),
            ctx.config.tls_key.as_deref(),
            &ctx.config.data_dir,
            &[addr.ip().to_string()],
        )?)
    } else {
        None
    };
    let fingerprint = identity.as_ref().map(|i| i.fingerprint());
    let quic_addr = match (ctx.config.quic_addr(), &identity) {
        (Some(q), Some(identity)) => {
            let local = crate::quic::start(ctx.clone(), q, identity, shutdown.clone())?;
            tracing::info!(
                quic = %local,
                certificate = %identity.source.display(),
                sha256 = %crate::tls::fingerprint_hex(&identity.fingerprint()),
                "QUIC listening"
            );
            Some(local)
        }
        _ => None,
    };
    let https = match (&identity, ctx.config.ws_tls) {
        (Some(identity), true) => Some(crate::listener::TlsSide::new(
            crate::tls::server_config(identity, crate::tls::ALPN_HTTP1)?,
            std::time::Duration::from_millis(ctx.config.tls_handshake_timeout_ms),
        )),
        _ => None,
    };
    Ok(TlsSides {
        fingerprint,
        quic_addr,
        https,
    })
}

/// The scrape port: `/metrics`, `/healthz` and `/readyz` only, with connection caps of its own.
fn serve_metrics_port(
    ctx: &Arc<NodeCtx>,
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    shutdown: &watch::Receiver<bool>,
) -> SocketAddr {
    let port = crate::listener::HttpPort::new(
        crate::http::ops_routes(ctx.clone()),
        crate::listener::ConnLimiter::new(
            crate::listener::METRICS_CONNECTIONS_MAX,
            crate::listener::METRICS_CONNECTIONS_PER_IP_MAX,
        ),
        None,
        std::time::Duration::from_millis(ctx.config.http_header_timeout_ms),
        ctx.metrics.clone(),
        |m| &m.metrics_port,
    );
    tokio::spawn(crate::listener::serve(listener, port, shutdown.clone()));
    local
}

/// Without scrapes, histogram samples would pile up in the exporter until the next render;
/// they are folded into buckets regularly.
fn spawn_metrics_upkeep(ctx: &Arc<NodeCtx>, shutdown: &watch::Receiver<bool>) {
    if !ctx.metrics.enabled() {
        return;
    }
    let m = ctx.metrics.clone();
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(
            crate::metrics::UPKEEP_INTERVAL_MS,
        ));
        loop {
            tokio::select! {
                _ = tick.tick() => m.upkeep(),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}
