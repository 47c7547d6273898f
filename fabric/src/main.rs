//! `fabric`: the node and its command line.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fabric::config::{Config, Durability, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;

mod cli_client;
mod sim_cmd;

/// mimalloc instead of glibc's malloc: a node allocates and frees many small, short-lived
/// buffers (frames, batches, replies) across threads, where glibc's arenas cost 10-17% of the
/// node's CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fabric: a durable, sharded message fabric for multi-tenant agent meshes.
///
/// Every acknowledgement means the message is on disk (fsynced, group commit).
#[derive(Parser)]
#[command(name = "fabric", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: HTTP and WebSocket on one port, data in a local directory.
    ///
    /// Settings come from, lowest to highest precedence: embedded defaults, the TOML file given
    /// by --config (keys are the long option names with underscores), FABRIC_* environment
    /// variables, and these flags.
    Serve(Box<ServeArgs>),
    Sim(sim_cmd::SimArgs),
    /// A cluster's files (`init`), and its nodes run on this host for development (`local`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    #[command(flatten)]
    Client(cli_client::ClientCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Write a new cluster of N nodes on this host into DIR (configs, certificates, admin token).
    ///
    /// Writes a cluster CA (DIR/ca/), a certificate per node (DIR/node-<i>/), one admin token
    /// (DIR/admin-token) and DIR/node-<i>.toml for each node; run each node with `fabric serve
    /// --config DIR/node-<i>.toml`. Refuses a DIR that is not empty unless --force.
    ///
    /// Node i listens on 127.0.0.1 from port BASE + 10 * (i - 1): HTTP/WebSocket there, client
    /// QUIC on the next port, the node link on the one after, metrics on the fourth. The admin
    /// token is FABRIC_ADMIN_TOKEN if set, else random; it is in DIR/admin-token and in every
    /// config.
    Init(ClusterArgs),
    /// Run a cluster's nodes on this host as child processes (development).
    ///
    /// Runs `init` first if DIR has no node-1.toml, then `fabric serve --config
    /// DIR/node-<i>.toml` for each node, their output lines prefixed with `[node <i>]`.
    /// Ctrl-C (SIGINT), SIGTERM or SIGHUP stops every node (SIGTERM, SIGKILL after 10 s); a
    /// node that exits by itself stops the others, and the command exits 1.
    Local(ClusterArgs),
    /// Add a node to a running cluster that `init` wrote into DIR.
    ///
    /// Asks the node at --url for the members, writes the new node's certificate and
    /// DIR/node-<id>.toml (ports laid out as `init` lays them out), and records it in the
    /// cluster's metadata group. Then run it with `fabric serve --config DIR/node-<id>.toml`:
    /// every shard's group adds it as a learner, catches it up and promotes it.
    AddNode(NodeChangeArgs),
    /// Remove node --id from a running cluster: every group removes its replica (handing its
    /// leaderships on first). Stop the node once `/v1/cluster` lists it in no group.
    RemoveNode(NodeChangeArgs),
}

#[derive(Args)]
struct NodeChangeArgs {
    /// The cluster's directory (as `init` wrote it: its CA and admin token).
    #[arg(long)]
    dir: PathBuf,
    /// A running node's HTTP base URL, e.g. http://127.0.0.1:7400.
    #[arg(long)]
    url: String,
    /// The node's id (add-node: default one above the highest member).
    #[arg(long)]
    id: Option<u64>,
}

#[derive(Args)]
struct ClusterArgs {
    /// Nodes in the cluster, 1 to 5.
    #[arg(long)]
    nodes: u32,
    /// The cluster's directory (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Node 1's HTTP/WebSocket port; node i's ports start 10 * (i - 1) above it.
    #[arg(long, default_value_t = fabric::cluster::init::BASE_PORT_DEFAULT)]
    base_port: u16,
    /// Shards of every node.
    #[arg(long, default_value_t = fabric::cluster::init::SHARDS_DEFAULT)]
    shards: u32,
    /// Write into DIR even if it is not empty (an existing cluster CA or node data directory
    /// is still never replaced).
    #[arg(long)]
    force: bool,
}

impl ClusterArgs {
    /// The options of `init`; the admin token comes from FABRIC_ADMIN_TOKEN if it is set.
    fn into_options(self) -> anyhow::Result<fabric::cluster::init::InitOptions> {
        let admin_token = match std::env::var("FABRIC_ADMIN_TOKEN") {
            Ok(t) => Some(t),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("FABRIC_ADMIN_TOKEN is not valid UTF-8")
            }
        };
        Ok(fabric::cluster::init::InitOptions {
            nodes: self.nodes,
            dir: self.dir,
            base_port: self.base_port,
            shards: self.shards,
            force: self.force,
            admin_token,
        })
    }
}

/// `fabric cluster init` and `fabric cluster local`.
fn run_cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Init(args) => {
            let done = fabric::cluster::init::init(&args.into_options()?)?;
            print!("{}", done.summary());
            Ok(())
        }
        ClusterCommand::AddNode(a) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let added = runtime.block_on(fabric::cluster::join::add_node(&a.dir, &a.url, a.id))?;
            println!(
                "node {} added (clients: {}); run it with: fabric serve --config {}",
                added.id,
                added.http,
                added.config.display()
            );
            Ok(())
        }
        ClusterCommand::RemoveNode(a) => {
            let Some(id) = a.id else {
                anyhow::bail!("remove-node needs --id");
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let members =
                runtime.block_on(fabric::cluster::join::remove_node(&a.dir, &a.url, id))?;
            println!("node {id} removed; members now: {}", members["members"]);
            Ok(())
        }
        ClusterCommand::Local(args) => {
            let options = args.into_options()?;
            let exe = std::env::current_exe().context("cannot find this executable")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            use fabric::cluster::local::{self, EndCause, Signals, STOP_TIMEOUT};
            let end = runtime.block_on(async {
                let mut signals = Signals::new()?;
                let stop = async move { signals.recv().await.to_string() };
                local::run(&options, &exe, STOP_TIMEOUT, stop).await
            })?;
            match end.cause {
                EndCause::Stopped(_) => Ok(()),
                EndCause::NodeExited { node, status } => {
                    anyhow::bail!("node {node} exited by itself ({status})")
                }
            }
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Print the effective configuration as TOML (what --config reads back; never a secret,
    /// derived defaults as comments) and exit.
    #[arg(long)]
    print_config: bool,
    /// TOML config file.
    #[arg(long, env = "FABRIC_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (WAL segments, node metadata, admin token). Default ./fabric-data.
    #[arg(long, env = "FABRIC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP and WebSocket listen address. Default 127.0.0.1:7400.
    #[arg(long, env = "FABRIC_LISTEN")]
    listen: Option<SocketAddr>,
    /// Shards (each with its own WAL). Default: one per core. Fixed once data exists.
    #[arg(long, env = "FABRIC_SHARDS")]
    shards: Option<u32>,
    /// Partitions keys hash into. Default 256. Fixed once data exists.
    #[arg(long, env = "FABRIC_PARTITIONS")]
    partitions: Option<u32>,
    /// Admin bearer token. If unset, one is generated on first start, stored in the data dir
    /// and printed once.
    #[arg(long, env = "FABRIC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Largest client frame or HTTP body, in bytes. Default 1048576.
    #[arg(long, env = "FABRIC_FRAME_BYTES_MAX")]
    frame_bytes_max: Option<usize>,
    /// Requests a session may have unacknowledged before the node stops reading it. Default 1024.
    #[arg(long, env = "FABRIC_INFLIGHT_REQUESTS_MAX")]
    inflight_requests_max: Option<u32>,
    /// A new connection must say hello within this time, in ms. Default 10000.
    #[arg(long, env = "FABRIC_HELLO_TIMEOUT_MS")]
    hello_timeout_ms: Option<u64>,
    /// A shard stops taking requests while its unwritten batch is this large, in bytes.
    /// Default 4 MiB.
    #[arg(long, env = "FABRIC_WAL_BATCH_BYTES_MAX")]
    wal_batch_bytes_max: Option<usize>,
    /// Request batches queued per shard before senders wait. Default 1024.
    #[arg(long, env = "FABRIC_SHARD_QUEUE_BATCHES_MAX")]
    shard_queue_batches_max: Option<usize>,
    /// Frames a shard pushes to a session before it must report them written. Default 1024.
    #[arg(long, env = "FABRIC_PUSH_CREDIT_FRAMES_MAX")]
    push_credit_frames_max: Option<u32>,
    /// Log entries one drain of one session may look at before the shard turns to the next.
    /// Default 4096.
    #[arg(long, env = "FABRIC_DRAIN_SCAN_ENTRIES_MAX")]
    drain_scan_entries_max: Option<usize>,
    /// Writes waiting for durability before a shard stops taking requests. Default 65536.
    #[arg(long, env = "FABRIC_PENDING_ACKS_MAX")]
    pending_acks_max: Option<usize>,
    /// Most server ops joined into one batch frame for a client that asked for them. Default 256.
    #[arg(long, env = "FABRIC_OUT_BATCH_OPS_MAX")]
    out_batch_ops_max: Option<u32>,
    /// WAL segment size at which a new segment starts, in bytes. Default 64 MiB.
    #[arg(long, env = "FABRIC_WAL_SEGMENT_BYTES_MAX")]
    wal_segment_bytes_max: Option<u64>,
    /// Per-shard WAL size above which old segments are deleted, in bytes. Default 256 MiB.
    /// Unacknowledged inbox messages are always kept.
    #[arg(long, env = "FABRIC_RETENTION_BYTES_MAX")]
    retention_bytes_max: Option<u64>,
    /// fsync (default: every ack is durable) or none (benchmark comparisons only).
    #[arg(long, env = "FABRIC_DURABILITY", value_enum)]
    durability: Option<Durability>,
    /// Serve QUIC beside WebSocket (true or false). Default true.
    #[arg(long, env = "FABRIC_QUIC")]
    quic: Option<bool>,
    /// QUIC (UDP) listen address. Default: the --listen host and the next port (127.0.0.1:7401).
    #[arg(long, env = "FABRIC_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM) for QUIC. Default: a self-signed one made on first start in
    /// the data dir; its SHA-256 fingerprint is printed at every start, for clients to pin.
    #[arg(long, env = "FABRIC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "FABRIC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve the HTTP and WebSocket port over TLS (https://, wss://) with the QUIC certificate.
    #[arg(long, env = "FABRIC_WS_TLS")]
    ws_tls: Option<bool>,
    /// Log format: human or json. The level comes from FABRIC_LOG (env-filter syntax).
    #[arg(long, env = "FABRIC_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Record metrics and serve GET /metrics: true (default) or false.
    #[arg(long, env = "FABRIC_METRICS", action = clap::ArgAction::Set)]
    metrics: Option<bool>,
    /// Also serve /metrics, /healthz and /readyz on this address (a separate scrape port).
    #[arg(long, env = "FABRIC_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Threads of the node's async runtime (1 to 256). Default: one per core.
    #[arg(long, env = "FABRIC_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Comma-separated meshes that get per-mesh metric series (at most 64).
    #[arg(long, env = "FABRIC_METRICS_MESHES", value_delimiter = ',')]
    metrics_meshes: Option<Vec<String>>,
    /// Body bytes of unacknowledged inbox messages one peer may hold before sends to it are
    /// refused with inbox_full. Default 64 MiB.
    #[arg(long, env = "FABRIC_INBOX_BACKLOG_BYTES_MAX")]
    inbox_backlog_bytes_max: Option<u64>,
    /// The same for a whole mesh (on one shard). Default 512 MiB.
    #[arg(long, env = "FABRIC_MESH_INBOX_BACKLOG_BYTES_MAX")]
    mesh_inbox_backlog_bytes_max: Option<u64>,
    /// Conversations of one mesh one shard holds. Default 100000.
    #[arg(long, env = "FABRIC_MESH_CONVERSATIONS_MAX")]
    mesh_conversations_max: Option<u32>,
    /// Longest wait before a failed shard is recovered, in ms. Default 30000.
    #[arg(long, env = "FABRIC_RESTART_BACKOFF_MS_MAX")]
    restart_backoff_ms_max: Option<u64>,
    /// A WAL write in flight longer than this (ms) fails /readyz for its shard. Default 10000.
    #[arg(long, env = "FABRIC_WAL_SYNC_STALL_MS_MAX")]
    wal_sync_stall_ms_max: Option<u64>,
    /// An HTTP request's headers must arrive within this time (also the idle keep-alive
    /// limit), in ms. Default 10000.
    #[arg(long, env = "FABRIC_HTTP_HEADER_TIMEOUT_MS")]
    http_header_timeout_ms: Option<u64>,
    /// An HTTP request's body must arrive within this time, in ms (else 408). Default 30000.
    #[arg(long, env = "FABRIC_HTTP_BODY_TIMEOUT_MS")]
    http_body_timeout_ms: Option<u64>,
    /// A TLS handshake on the HTTP port (--ws-tls) must finish within this time, in ms.
    /// Default 10000.
    #[arg(long, env = "FABRIC_TLS_HANDSHAKE_TIMEOUT_MS")]
    tls_handshake_timeout_ms: Option<u64>,
    /// Client connections open at once (HTTP/WebSocket and QUIC together). Default 65536.
    #[arg(long, env = "FABRIC_CONNECTIONS_MAX")]
    connections_max: Option<u32>,
    /// Client connections open at once from one address (IPv6: one /64). Default 16384.
    #[arg(long, env = "FABRIC_CONNECTIONS_PER_IP_MAX")]
    connections_per_ip_max: Option<u32>,
    /// Conversations one session may be subscribed to at once. Default 1024.
    #[arg(long, env = "FABRIC_SESSION_SUBSCRIPTIONS_MAX")]
    session_subscriptions_max: Option<usize>,
    /// Ping each WebSocket session this often, in ms (0: never). Default 30000.
    #[arg(long, env = "FABRIC_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// Close a session whose pong is this late, in ms. Default 30000.
    #[arg(long, env = "FABRIC_PONG_TIMEOUT_MS")]
    pong_timeout_ms: Option<u64>,
    /// Close a session whose writes make no progress for this long, in ms. Default 30000.
    #[arg(long, env = "FABRIC_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// Answer a request its shard has not answered within this time `unavailable`, in ms.
    /// Default 5000.
    #[arg(long, env = "FABRIC_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// Frames a connection may send before its hello. Default 16.
    #[arg(long, env = "FABRIC_PREHELLO_FRAMES_MAX")]
    prehello_frames_max: Option<u32>,
    /// Frames the node answers a connection before its welcome. Default 64.
    #[arg(long, env = "FABRIC_PREHELLO_ANSWERS_MAX")]
    prehello_answers_max: Option<u32>,
    /// Bytes of recent conversation entries and inbox bodies each shard keeps in memory
    /// (older ones are read from disk). Default 8 MiB.
    #[arg(long, env = "FABRIC_LOG_CACHE_BYTES_MAX")]
    log_cache_bytes_max: Option<u64>,
    /// A conversation's disk index keeps an entry per this many of its entries. Default 256.
    #[arg(long, env = "FABRIC_LOG_INDEX_STRIDE_RECORDS")]
    log_index_stride_records: Option<u64>,
    /// Bytes one disk read of the log asks for. Default 256 KiB.
    #[arg(long, env = "FABRIC_LOG_READ_BYTES_MAX")]
    log_read_bytes_max: Option<usize>,
    /// Disk reads of the log each shard has in flight at once. Default 16.
    #[arg(long, env = "FABRIC_LOG_READS_INFLIGHT_MAX")]
    log_reads_inflight_max: Option<usize>,
}

impl ServeArgs {
    fn into_config(mut self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        self.set_optional(&mut c);
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            data_dir,
            listen,
            shards,
            partitions,
            frame_bytes_max,
            inflight_requests_max,
            hello_timeout_ms,
            wal_batch_bytes_max,
            shard_queue_batches_max,
            push_credit_frames_max,
            drain_scan_entries_max,
            pending_acks_max,
            out_batch_ops_max,
            wal_segment_bytes_max,
            retention_bytes_max,
            durability,
            log_format,
            metrics,
            metrics_meshes,
            inbox_backlog_bytes_max,
            mesh_inbox_backlog_bytes_max,
            mesh_conversations_max,
            restart_backoff_ms_max,
            wal_sync_stall_ms_max,
            http_header_timeout_ms,
            http_body_timeout_ms,
            tls_handshake_timeout_ms,
            connections_max,
            connections_per_ip_max
        );
        set!(
            session_subscriptions_max,
            ping_interval_ms,
            pong_timeout_ms,
            write_timeout_ms,
            request_timeout_ms,
            prehello_frames_max,
            prehello_answers_max,
            log_cache_bytes_max,
            log_index_stride_records,
            log_read_bytes_max,
            log_reads_inflight_max
        );
        c.validate()?;
        Ok(c)
    }

    /// The settings with no default value of their own (addresses, TLS, the admin token).
    fn set_optional(&mut self, c: &mut Config) {
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen.take();
        }
        if self.worker_threads.is_some() {
            c.worker_threads = self.worker_threads.take();
        }
        if let Some(q) = self.quic {
            c.quic = q;
        }
        if let Some(t) = self.ws_tls {
            c.ws_tls = t;
        }
        if self.quic_listen.is_some() {
            c.quic_listen = self.quic_listen.take();
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.take();
            c.tls_key = self.tls_key.take();
        }
        if self.admin_token.is_some() {
            c.admin_token = self.admin_token.take();
        }
    }
}

/// Listens for SIGTERM and SIGINT. Made before the node starts, so that a signal that arrives
/// right after the "listening" line is never missed (it would kill the process ungracefully).
struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn new() -> anyhow::Result<ShutdownSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ShutdownSignal {
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignal {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Client(cmd) => cli_client::run(cmd),
        Command::Cluster(cmd) => run_cluster(cmd),
        Command::Sim(args) => {
            if !sim_cmd::run(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Serve(args) => {
            let print_config = args.print_config;
            let config = args.into_config()?;
            if print_config {
                print!("{}", config.to_printed_toml());
                return Ok(());
            }
            // Kept until exit: its drop writes out the log lines still queued.
            let _log = fabric::logging::init(config.log_format).context("cannot start logging")?;
            let runtime = config
                .runtime_builder()
                .thread_name("fabric")
                .build()
                .context("cannot start the tokio runtime")?;
            runtime.block_on(async move {
                let mut signal = ShutdownSignal::new()?;
                let data_dir = config.data_dir.clone();
                let node = fabric::node::start(config)
                    .await
                    .with_context(|| format!("cannot start a node on {}", data_dir.display()))?;
                if let (Some(quic), Some(fp)) = (node.quic_addr(), node.tls_fingerprint()) {
                    fabric::logging::say(format_args!(
                        "fabric: QUIC on quic://{quic} (ALPN fabric/1), certificate SHA-256 {}",
                        fabric::tls::fingerprint_hex(&fp)
                    ));
                }
                let (http, ws) = if node.ctx().config.ws_tls {
                    ("https", "wss")
                } else {
                    ("http", "ws")
                };
                fabric::logging::say(format_args!(
                    "fabric: listening on {http}://{} (WebSocket: {ws}://{}/v1/ws)",
                    node.addr(),
                    node.addr()
                ));
                signal.recv().await;
                node.shutdown().await;
                anyhow::Ok(())
            })
        }
    }
}

#[cfg(test)]
mod serve_args_tests;
