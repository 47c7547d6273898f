//! Node configuration: embedded defaults, then a TOML file, then `FABRIC_*` environment
//! variables, then command-line flags (each layer overrides the one before).
//!
//! The numeric limits (their defaults, ranges and relations) are `fabric_router::limits::Limits`;
//! `Config` carries them as fields of the same names ([`Config::limits`]), so the TOML keys,
//! flags and variables stay flat.

use crate::cluster::config::{ClusterConfig, ClusterConfigError};
use fabric_router::limits::{Limits, LimitsError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything a node needs to start. Units are last in every name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the WAL segments, node metadata and admin token live.
    pub data_dir: PathBuf,
    /// HTTP and WebSocket address (one port).
    pub listen: SocketAddr,
    /// Shard actors, each with its own WAL. Default: one per core.
    pub shards: u32,
    /// Partitions the router hashes keys into; fixed for the life of a data dir.
    pub partitions: u32,
    /// Admin bearer token. If unset, one is generated on first start and kept in the data dir.
    pub admin_token: Option<String>,
    /// Largest client frame or HTTP body accepted.
    pub frame_bytes_max: usize,
    /// Requests one session may have waiting for acknowledgement before the node stops reading it.
    pub inflight_requests_max: u32,
    /// A new session must say hello within this time.
    pub hello_timeout_ms: u64,
    /// Rotate WAL segments at this size.
    pub wal_segment_bytes_max: u64,
    /// Stop taking requests into a shard while its unwritten batch is this large.
    pub wal_batch_bytes_max: usize,
    /// Per-shard WAL size above which the oldest segments are deleted (unacked inbox data is kept).
    pub retention_bytes_max: u64,
    /// Request batches queued for one shard before senders wait (bounded channel capacity).
    pub shard_queue_batches_max: usize,
    /// Frames a shard pushes to a session before the session reports them written.
    pub push_credit_frames_max: u32,
    /// Log entries one drain of one session may look at before the shard turns to the next.
    pub drain_scan_entries_max: usize,
    /// Writes waiting for durability before a shard stops taking requests.
    pub pending_acks_max: usize,
    /// Most server ops joined into one batch frame for a client that asked for batch frames
    /// (`options` `batch`), 1..=`fabric_proto::BATCH_OPS_MAX`.
    pub out_batch_ops_max: u32,
    /// `fsync` (default; every ack is durable) or `none` (benchmark comparisons only).
    pub durability: Durability,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// Record metrics and serve `GET /metrics` (default). Off: no recorder, no per-batch export.
    pub metrics: bool,
    /// A second address serving only `/metrics`, `/healthz` and `/readyz` (for a scrape port
    /// that is not exposed to clients). The main port serves them too.
    pub metrics_listen: Option<SocketAddr>,
    /// Threads of the node's async runtime (sessions, routing, shard hosts, node links).
    /// Unset: one per core. Nodes sharing a machine split its cores (`fabric cluster local`
    /// gives each its share). WAL writer threads come on top, one per shard.
    pub worker_threads: Option<usize>,
    /// Serve QUIC (ALPN `fabric/1`) beside WebSocket (default on).
    pub quic: bool,
    /// QUIC's UDP address. Default: the `listen` host with the next port (127.0.0.1:7401 for
    /// the default `listen`; port 0, any free port, when `listen`'s port is 0).
    pub quic_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for QUIC. Default: a self-signed certificate generated on first
    /// start in `data_dir/tls/`, whose SHA-256 fingerprint the node prints for clients to pin.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Serve the HTTP port over TLS (HTTPS and `wss://`) with the same certificate as QUIC.
    pub ws_tls: bool,
    /// Meshes that get per-mesh series (label `mesh`); every other mesh is only in the
    /// per-shard totals, so label cardinality stays bounded. At most 64.
    pub metrics_meshes: Vec<String>,
    /// Body bytes of unacknowledged inbox messages one peer may hold; a send that would grow a
    /// full backlog is refused with `inbox_full` (nothing accepted is ever dropped).
    pub inbox_backlog_bytes_max: u64,
    /// The same for a whole mesh on one shard, each message counted once.
    pub mesh_inbox_backlog_bytes_max: u64,
    /// Conversations of one mesh one shard holds; the first append to one more is refused
    /// with `too_large`.
    pub mesh_conversations_max: u32,
    /// Longest wait before a shard whose storage failed is recovered (the wait doubles from
    /// 10 ms per failure in a row; a disk-full shard refuses writes that long).
    pub restart_backoff_ms_max: u64,
    /// A WAL write (fdatasync) in flight longer than this makes `/readyz` fail for its shard.
    pub wal_sync_stall_ms_max: u64,
    /// An HTTP request's headers must be in within this time of the connection being ready
    /// for one (so it also bounds how long an idle keep-alive connection stays open); else the
    /// connection is closed.
    pub http_header_timeout_ms: u64,
    /// An HTTP request's body must be in within this time of its handler starting to read it;
    /// else 408 and the connection is closed.
    pub http_body_timeout_ms: u64,
    /// A TLS handshake on the HTTP port (`ws_tls`) must finish within this time of the accept.
    pub tls_handshake_timeout_ms: u64,
    /// Client connections open at once, the HTTP/WebSocket port and QUIC together; more are
    /// refused (HTTP 503 `overloaded`, QUIC close 1013).
    pub connections_max: u32,
    /// Client connections open at once from one address (IPv6: one /64).
    pub connections_per_ip_max: u32,
    /// Conversations one session may be subscribed to at once (`too_large` beyond).
    pub session_subscriptions_max: usize,
    /// The node pings each WebSocket session this often (0: never; QUIC uses its own
    /// keepalives and idle timeout instead).
    pub ping_interval_ms: u64,
    /// A session whose pong is this late is closed (the peer is gone or stuck).
    pub pong_timeout_ms: u64,
    /// A session whose writes make no progress for this long is closed (the client stopped
    /// reading).
    pub write_timeout_ms: u64,
    /// A request its shard has not answered within this time is answered `unavailable`.
    pub request_timeout_ms: u64,
    /// Frames a connection may send before its hello; one more closes it.
    pub prehello_frames_max: u32,
    /// Frames the node answers a connection before it is welcomed; past it, it is closed.
    pub prehello_answers_max: u32,
    /// Bytes of recent conversation entries and inbox bodies a shard keeps in memory; older
    /// ones are read from disk.
    pub log_cache_bytes_max: u64,
    /// A conversation's disk index keeps an entry per this many of its entries at most.
    pub log_index_stride_records: u64,
    /// Bytes one disk read of the log asks for.
    pub log_read_bytes_max: usize,
    /// Disk reads of the log one shard has in flight at once.
    pub log_reads_inflight_max: usize,
    /// The `[cluster]` section: the replicated cluster this node is a member of. Absent: a
    /// single node.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Fsync,
    None,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The numeric fields of [`Config`], which are [`Limits`]' fields (same names). A literal
/// of either struct without `..` must name every field, so the compiler holds this list, the
/// two structs and `Config::default` in step.
macro_rules! limit_fields {
    ($mac:ident!($($args:tt)*)) => {
        $mac!($($args)* shards, partitions, frame_bytes_max, inflight_requests_max,
            hello_timeout_ms, wal_segment_bytes_max, wal_batch_bytes_max, retention_bytes_max,
            shard_queue_batches_max, push_credit_frames_max, drain_scan_entries_max,
            pending_acks_max, out_batch_ops_max, inbox_backlog_bytes_max,
            mesh_inbox_backlog_bytes_max, mesh_conversations_max, restart_backoff_ms_max,
            wal_sync_stall_ms_max, http_header_timeout_ms, http_body_timeout_ms,
            tls_handshake_timeout_ms, connections_max, connections_per_ip_max,
            session_subscriptions_max, ping_interval_ms, pong_timeout_ms, write_timeout_ms,
            request_timeout_ms, prehello_frames_max, prehello_answers_max, log_cache_bytes_max,
            log_index_stride_records, log_read_bytes_max, log_reads_inflight_max)
    };
}

/// `Limits { field: $from.field, .. }` over every limit field.
macro_rules! limits_of {
    ($from:expr; $($f:ident),*) => { Limits { $($f: $from.$f),* } };
}

/// A `Config` whose limits are `$l`'s and whose other fields are given.
macro_rules! config_with {
    ({ $($field:ident : $value:expr),* $(,)? } $l:expr; $($f:ident),*) => {
        Config { $($field: $value,)* $($f: $l.$f,)* }
    };
}

impl Default for Config {
    /// `Limits::default()`, with one shard per core; the rest as documented.
    fn default() -> Config {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limits = Limits {
            shards: Limits::shards_for_cores(cores),
            ..Limits::default()
        };
        Config::with_limits(limits)
    }
}

impl Config {
    /// The default configuration with these limits.
    pub fn with_limits(limits: Limits) -> Config {
        limit_fields!(config_with!({
            data_dir: PathBuf::from("./fabric-data"),
            listen: "127.0.0.1:7400".parse().expect("valid default address"),
            admin_token: None,
            durability: Durability::Fsync,
            log_format: LogFormat::Human,
            metrics: true,
            metrics_listen: None,
            worker_threads: None,
            metrics_meshes: Vec::new(),
            quic: true,
            quic_listen: None,
            tls_cert: None,
            tls_key: None,
            ws_tls: false,
            cluster: None,
        } limits;))
    }

    /// This configuration's numeric limits.
    pub fn limits(&self) -> Limits {
        limit_fields!(limits_of!(self;))
    }
}

pub use fabric_router::limits::{FRAME_BYTES_MAX_FLOOR, FRAME_BYTES_MAX_LIMIT};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A limit out of its range, or two limits that do not fit together (both named). Not a
    /// `source`: the message already carries it, and a report would print it twice.
    #[error("invalid configuration: {0}")]
    Limits(LimitsError),
    /// The `[cluster]` section names no coherent cluster (the key and value named).
    #[error("invalid configuration: {0}")]
    Cluster(ClusterConfigError),
}

impl From<ClusterConfigError> for ConfigError {
    fn from(e: ClusterConfigError) -> ConfigError {
        ConfigError::Cluster(e)
    }
}

impl From<LimitsError> for ConfigError {
    fn from(e: LimitsError) -> ConfigError {
        ConfigError::Limits(e)
    }
}

impl Config {
    /// Reads a TOML file whose keys are the field names above; missing keys keep their defaults.
    /// The effective configuration as TOML that `--config` reads back (`fabric serve
    /// --print-config`). Secrets (the admin token) are never printed; derived defaults (`shards`
    /// from the core count, `quic_listen` from `listen`) are printed as comments, so a file
    /// made from this output keeps deriving them on another machine.
    pub fn to_printed_toml(&self) -> String {
        let mut table = match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t,
            _ => return String::new(),
        };
        table.remove("admin_token");
        let shards_derived = self.shards == Config::default().shards;
        if shards_derived {
            table.remove("shards");
        }
        let mut out = String::from(
            "# fabric serve --print-config: the effective configuration (read back with --config).\n\
             # admin_token is never printed: set it with --admin-token or FABRIC_ADMIN_TOKEN, or\n\
             # let the node keep the one it generated in data_dir/admin-token.\n",
        );
        if shards_derived {
            out.push_str(&format!(
                "# shards = {}  (derived: one per core)\n",
                self.shards
            ));
        }
        if self.quic_listen.is_none() {
            out.push_str("# quic_listen  (derived: the listen host, next port)\n");
        }
        out.push_str(&toml::to_string(&table).unwrap_or_default());
        out
    }

    pub fn from_toml_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Where QUIC listens, if it is on (see `quic_listen`).
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        if !self.quic {
            return None;
        }
        Some(self.quic_listen.unwrap_or_else(|| {
            let port = match self.listen.port() {
                0 => 0,
                p => p.saturating_add(1),
            };
            SocketAddr::new(self.listen.ip(), port)
        }))
    }

    /// Largest `send`/`append` body (see `Limits::body_bytes_max`).
    pub fn body_bytes_max(&self) -> usize {
        self.limits().body_bytes_max()
    }

    /// Replies one session can be owed at once (see `Limits::session_replies_owed_max`).
    pub fn session_replies_owed_max(&self) -> usize {
        self.limits().session_replies_owed_max()
    }

    /// Capacity of a session's reply channel (see `Limits::session_reply_queue_max`).
    pub fn session_reply_queue_max(&self) -> usize {
        self.limits().session_reply_queue_max()
    }

    /// The session core's limits for this node's settings.
    /// On a cluster node it names the members' client URLs in id order (`welcome`'s `nodes`).
    pub fn session_config(&self) -> fabric_edge::SessionConfig {
        let mut config = self.limits().session_config();
        if let Some(cluster) = &self.cluster {
            let mut members: Vec<_> = cluster.members.iter().collect();
            members.sort_by_key(|m| m.id);
            config.nodes = members.iter().map(|m| m.http.as_str().into()).collect();
        }
        config
    }

    /// Every limit in its range and every relation between limits (`Limits::validate`),
    /// then the settings that are not numbers, then the `[cluster]` section if there is one
    /// (`ClusterConfig::validate`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits().validate()?;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert and tls_key go together");
        }
        if self.metrics_meshes.len() > crate::metrics::METRICS_MESHES_MAX {
            return bad("metrics_meshes may name at most 64 meshes");
        }
        for m in &self.metrics_meshes {
            if let Err(e) = fabric_proto::validate_id(fabric_proto::IdKind::Mesh, m) {
                return Err(ConfigError::Invalid(format!(
                    "metrics_meshes: {m:?}: {}",
                    e.message
                )));
            }
        }
        if self
            .worker_threads
            .is_some_and(|n| !(1..=WORKER_THREADS_MAX).contains(&n))
        {
            return bad("worker_threads must be 1 to 256");
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }

    /// A runtime builder with `worker_threads` applied (the node's; the bench's child nodes
    /// use it too).
    pub fn runtime_builder(&self) -> tokio::runtime::Builder {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            b.worker_threads(n);
        }
        b.enable_all();
        b
    }
}

/// Largest `worker_threads`.
pub const WORKER_THREADS_MAX: usize = 256;

#[cfg(test)]
mod session_limit_tests {
    use super::*;
    use fabric_edge::{InFrame, Session};
    use fabric_proto::internal::{Reply, ShardOp};
    use fabric_proto::ServerOp;

    /// Requests a session core with `config`'s limits takes in flight when its glue ignores
    /// `wants_read` (whole batch frames of appends), before it refuses with `overloaded`.
    fn inflight_accepted(config: &Config) -> usize {
        let mut s = Session::new(1, 0, config.session_config());
        let hello = br#"{"op":"hello","mesh":"m","peer":"p","token":"t"}"#;
        s.handle_frame(
            0,
            InFrame {
                binary: false,
                bytes: hello,
            },
        );
        while s.poll_request().is_some() {}
        s.handle_reply(
            0,
            0,
            Reply::Frame(ServerOp::Welcome {
                session: 1,
                acked: 0,
                head: 0,
                nodes: Vec::new(),
            }),
        );
        let ops: Vec<String> = (0..fabric_proto::BATCH_OPS_MAX)
            .map(|r| format!(r#"{{"op":"append","ref":{r},"conv":"c","body":1}}"#))
            .collect();
        let batch = format!("[{}]", ops.join(","));
        let mut accepted = 0;
        for _ in 0..8 {
            s.handle_frame(
                0,
                InFrame {
                    binary: false,
                    bytes: batch.as_bytes(),
                },
            );
            while let Some((_, req)) = s.poll_request() {
                accepted += usize::from(matches!(req.op, ShardOp::Append { .. }));
            }
        }
        accepted
    }

    #[test]
    fn a_sessions_reply_channel_holds_everything_it_can_be_owed() {
        // Proves the zombie-session sizing: the reply channel holds every answer the session
        // core lets a session have in flight (the soft limit plus one batch frame, which the
        // old capacity of in-flight + credit x shards + 64 did not) plus every shard's push
        // credit, and the core holds as many frames before closing as overloaded.
        for shards in [1, 4, 64] {
            let c = Config {
                shards,
                ..Config::default()
            };
            c.validate().unwrap();
            let inflight = inflight_accepted(&c);
            assert!(inflight > c.inflight_requests_max as usize, "{inflight}");
            let owed = inflight + c.push_credit_frames_max as usize * shards as usize;
            assert!(c.session_reply_queue_max() >= owed, "{shards} shards");
            assert!(c.session_config().pending_transmit_frames_max >= owed);
        }
        let huge = Config {
            push_credit_frames_max: u32::MAX,
            shards: 1024,
            partitions: 1024,
            ..Config::default()
        };
        assert!(
            huge.validate().is_err(),
            "a reply channel that large is refused"
        );
    }

    #[test]
    fn frame_and_body_limits_are_bounded_and_derived() {
        // Proves frame_bytes_max is capped so a body always fits a WAL record, body_bytes_max is
        // 1 KiB below it (1,047,552 by default), and the session timers are validated.
        let c = Config::default();
        assert_eq!(c.body_bytes_max(), 1_047_552);
        assert_eq!(c.session_config().body_bytes_max, 1_047_552);
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(&|c| c.frame_bytes_max = 8 << 20).is_ok());
        assert!(with(&|c| c.frame_bytes_max = (8 << 20) + 1).is_err());
        assert!(with(&|c| c.frame_bytes_max = 16 << 20).is_err());
        assert!(with(&|c| c.frame_bytes_max = 1024).is_err());
        assert!(with(&|c| c.ping_interval_ms = 0).is_ok());
        assert!(with(&|c| c.ping_interval_ms = 50).is_err());
        assert!(with(&|c| c.write_timeout_ms = 0).is_err());
        assert!(with(&|c| c.session_subscriptions_max = 0).is_err());
        assert!(with(&|c| c.prehello_frames_max = 0).is_err());
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    #[test]
    fn config_limits_are_the_limits_and_read_back_from_toml() {
        // Proves the configuration's numeric keys are exactly `Limits`' (same names, same
        // defaults apart from the per-core shard count), and a limit set in TOML reaches
        // `limits()`.
        let c = Config::default();
        let table = toml::Value::try_from(&c).expect("serialisable");
        let limits = toml::Value::try_from(c.limits()).expect("serialisable");
        for (key, value) in limits.as_table().expect("a table") {
            assert_eq!(table.get(key), Some(value), "{key}");
        }
        assert_eq!(
            fabric_router::limits::LIMIT_KEYS.len(),
            limits.as_table().map_or(0, |t| t.len())
        );
        assert_eq!(
            Limits {
                shards: 1,
                ..c.limits()
            },
            Limits::default()
        );
        let c: Config = toml::from_str("pending_acks_max = 7").expect("accepted");
        assert_eq!(c.limits().shard_config(0).pending_acks_max, 7);
    }

    #[test]
    fn a_broken_relation_is_refused_naming_both_limits_and_values() {
        // Proves Config::validate refuses limits that do not fit together with a message that
        // names both limits and their values.
        let c = Config {
            inbox_backlog_bytes_max: 1 << 30,
            mesh_inbox_backlog_bytes_max: 1 << 20,
            ..Config::default()
        };
        let e = c.validate().expect_err("refused").to_string();
        assert!(
            e.contains("mesh_inbox_backlog_bytes_max 1048576")
                && e.contains("inbox_backlog_bytes_max 1073741824"),
            "{e}"
        );
        let c = Config {
            frame_bytes_max: 8 << 20,
            inbox_backlog_bytes_max: 1 << 20,
            ..Config::default()
        };
        let e = c.validate().expect_err("refused").to_string();
        assert!(
            e.contains("inbox_backlog_bytes_max 1048576") && e.contains("frame_bytes_max 8388608"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod documented_keys_tests {
    use super::*;

    /// The keys of docs/OPERATIONS.md's settings table (first column, in backticks).
    fn documented_keys() -> Vec<String> {
        let doc = include_str!("../../docs/OPERATIONS.md");
        doc.lines()
            .skip_while(|l| !l.starts_with("| `data_dir`"))
            .take_while(|l| l.starts_with("| `"))
            .filter_map(|l| l.split('`').nth(1).map(str::to_string))
            .collect()
    }

    #[test]
    fn every_documented_key_is_a_key_the_config_accepts() {
        // Proves docs/OPERATIONS.md documents no setting the node would refuse: each key of
        // its table is a field of the TOML the node reads (`deny_unknown_fields` refuses
        // anything else), e.g. `out_batch_ops_max`, once documented and refused.
        let keys = documented_keys();
        assert!(keys.len() > 20, "the table was found: {keys:?}");
        let toml_value = toml::Value::try_from(Config::default()).expect("serialisable");
        let table = toml_value.as_table().expect("a table");
        for key in &keys {
            // Unset options (no default) are not serialised; a file may still set them.
            let optional = [
                "admin_token",
                "worker_threads",
                "metrics_listen",
                "quic_listen",
                "tls_cert",
                "tls_key",
            ];
            assert!(
                table.contains_key(key) || optional.contains(&key.as_str()),
                "documented key {key} is not a config field"
            );
        }
    }

    #[test]
    fn worker_threads_sizes_the_runtime_and_is_bounded() {
        // Proves worker_threads from TOML sizes the runtime the node is built on, unset means
        // one worker per core, and 0 or more than WORKER_THREADS_MAX is refused naming it.
        let c: Config = toml::from_str("worker_threads = 1").expect("accepted");
        c.validate().expect("valid");
        let rt = c.runtime_builder().build().expect("a runtime");
        assert_eq!(rt.metrics().num_workers(), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rt = Config::default()
            .runtime_builder()
            .build()
            .expect("a runtime");
        assert_eq!(rt.metrics().num_workers(), cores);
        for bad in [0, WORKER_THREADS_MAX + 1] {
            let c = Config {
                worker_threads: Some(bad),
                ..Config::default()
            };
            let e = c.validate().expect_err("refused");
            assert!(e.to_string().contains("worker_threads"), "{e}");
        }
        assert!(crate::cluster::local::worker_threads_share(3) >= 1);
        assert_eq!(crate::cluster::local::worker_threads_share(1), cores);
    }

    #[test]
    fn out_batch_ops_max_is_read_from_toml_and_bounded() {
        // Proves out_batch_ops_max reaches the session core, and a value outside
        // 1..=BATCH_OPS_MAX is refused with a message naming it.
        let c: Config = toml::from_str("out_batch_ops_max = 16").expect("accepted");
        assert_eq!(c.session_config().out_batch_ops_max, 16);
        let zero = Config {
            out_batch_ops_max: 0,
            ..Config::default()
        };
        let e = zero.validate().expect_err("refused");
        assert!(e.to_string().contains("out_batch_ops_max"), "{e}");
    }

    #[test]
    fn printed_config_reads_back_and_hides_the_admin_token() {
        // Proves --print-config's TOML is accepted by --config and gives the same
        // configuration back, prints no secret, keeps derived defaults as comments, and
        // prints only keys docs/OPERATIONS.md documents.
        let c = Config {
            admin_token: Some("s3cret-token".into()),
            retention_bytes_max: 1 << 30,
            metrics_meshes: vec!["m1".into()],
            ..Config::default()
        };
        let text = c.to_printed_toml();
        assert!(!text.contains("s3cret-token"), "{text}");
        assert!(text.contains("# shards = "), "{text}");
        assert!(text.contains("# quic_listen"), "{text}");
        let back: Config = toml::from_str(&text).expect("--config reads it back");
        assert_eq!(
            back,
            Config {
                admin_token: None,
                ..c
            }
        );
        let documented = documented_keys();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
        {
            let key = line.split(" = ").next().unwrap_or_default();
            assert!(
                documented.iter().any(|d| d == key),
                "printed key {key} is not documented"
            );
        }
    }
}

#[cfg(test)]
mod cluster_section_tests {
    use super::*;

    /// The rows of a table of docs/OPERATIONS.md whose header starts with `header`: the first
    /// cell (backticks removed) and the second.
    fn doc_table(header: &str) -> Vec<(String, String)> {
        let doc = include_str!("../../docs/OPERATIONS.md");
        doc.lines()
            .skip_while(|l| !l.starts_with(header))
            .skip(2)
            .take_while(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                (cells[0].replace('`', ""), cells[1].replace('`', ""))
            })
            .collect()
    }

    fn two_nodes() -> ClusterConfig {
        crate::cluster::config::example(2, 1, "c-1")
    }

    #[test]
    fn a_config_file_with_a_cluster_section_loads_validates_and_prints_back() {
        // Proves [cluster] in a config file reaches Config::cluster, absent it is None (a
        // single node), Config::validate refuses a bad section naming its key, and
        // --print-config prints the section so that --config reads it back unchanged.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let text = r#"
            listen = "127.0.0.1:7400"
            [cluster]
            id = "c-1"
            node = 2
            link_listen = "127.0.0.1:7412"
            ca_cert = "/c/ca/ca.pem"
            node_cert = "/c/node-2/node-2.pem"
            node_key = "/c/node-2/node-2.key"
            raft_heartbeat_ms = 50
            [[cluster.members]]
            id = 1
            link = "127.0.0.1:7402"
            http = "http://127.0.0.1:7400"
            [[cluster.members]]
            id = 2
            link = "127.0.0.1:7412"
            http = "http://127.0.0.1:7410"
        "#;
        std::fs::write(&path, text).unwrap();
        let c = Config::from_toml_file(&path).unwrap();
        c.validate().unwrap();
        let cluster = c.cluster.clone().expect("a cluster section");
        assert_eq!((cluster.node, cluster.members.len()), (2, 2));
        assert_eq!(cluster.raft_heartbeat_ms, 50);
        assert_eq!(cluster.replication_factor(), 1);

        let printed = c.to_printed_toml();
        assert!(printed.contains("[cluster]"), "{printed}");
        let back: Config = toml::from_str(&printed).expect("--config reads it back");
        assert_eq!(back, c);

        assert_eq!(Config::default().cluster, None);
        assert!(!Config::default().to_printed_toml().contains("cluster"));

        std::fs::write(&path, text.replace("node = 2", "node = 3")).unwrap();
        let e = Config::from_toml_file(&path)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("cluster.node 3"), "{e}");
        std::fs::write(&path, text.replace("raft_heartbeat_ms", "heartbeat_ms")).unwrap();
        assert!(
            Config::from_toml_file(&path).is_err(),
            "unknown key refused"
        );
    }

    #[test]
    fn the_documented_cluster_keys_are_the_sections_keys_with_their_defaults() {
        // Proves docs/OPERATIONS.md's [cluster] tables list exactly the keys the section and
        // a member have, and each numeric default as the code has it.
        let full = ClusterConfig {
            replication_factor: Some(1),
            founders: Some(vec![1, 2]),
            ..two_nodes()
        };
        let value = toml::Value::try_from(&full).unwrap();
        let table = value.as_table().unwrap();
        let rows = doc_table("| `[cluster]` key");
        let mut documented: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        documented.sort();
        keys.sort();
        assert_eq!(documented, keys);
        let defaults = toml::Value::try_from(two_nodes()).unwrap();
        for (key, default) in &rows {
            if let Ok(n) = default.parse::<i64>() {
                assert_eq!(
                    defaults.get(key).and_then(|v| v.as_integer()),
                    Some(n),
                    "{key}"
                );
            }
        }
        let member_rows = doc_table("| `[[cluster.members]]` key");
        let mut member_keys: Vec<&str> = member_rows.iter().map(|(k, _)| k.as_str()).collect();
        member_keys.sort();
        assert_eq!(member_keys, ["http", "id", "link"]);
    }
}
