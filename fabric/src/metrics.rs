//! Prometheus metrics for one node.
//!
//! Each node builds its own `PrometheusRecorder` (never a global one, so several nodes can run
//! in one process, as the tests do) and registers every metric handle once at start. The hot
//! paths hold those handles and update them through the `metrics` facade's atomic handles; they
//! never look a metric up by name.
//!
//! The cores count into plain stats structs (`ShardStats`, `SessionStats`); the glue turns the
//! differences since its last export into counter increments once per loop iteration (per batch
//! of frames or requests, per group commit), never per message. Gauges that cost a walk over
//! peers (backlog, per-mesh figures) are refreshed at most every [`REFRESH_INTERVAL_MS`].
//!
//! Label cardinality is bounded: labels are transport, error code, hello failure reason, shard
//! index, and mesh id only for the meshes named in `metrics_meshes`; on a clustered node also
//! the members' ids ([`raft`]).

pub mod raft;

use fabric_edge::SessionStats;
use fabric_proto::ErrorCode;
use fabric_shard::{Shard, ShardStats};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Gauges that walk peers (backlog, per-mesh figures) are refreshed at most this often.
pub const REFRESH_INTERVAL_MS: u64 = 500;
/// Histogram samples are folded into buckets at least this often when nobody scrapes, so that
/// memory stays bounded.
pub const UPKEEP_INTERVAL_MS: u64 = 5_000;
/// Most inbox log entries one refresh walks to count backlogs (past it they are lower bounds,
/// and `fabric_inbox_backlog_truncated` says so).
pub const BACKLOG_SCAN_ENTRIES_MAX: usize = 1_000_000;
/// Most meshes that may get per-mesh series (`metrics_meshes`).
pub const METRICS_MESHES_MAX: usize = 64;

/// Latency buckets, seconds: 50 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Records per group commit.
const COMMIT_RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0,
];
/// Bytes per group commit.
const COMMIT_BYTES_BUCKETS: &[f64] = &[
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

const METADATA: Metadata<'static> = Metadata::new("fabric", Level::INFO, Some("fabric::metrics"));

/// The hello failure reasons, in the order of `TransportMetrics::hello_failures`.
pub const HELLO_FAILURE_REASONS: [&str; 4] =
    ["unauthorized", "shard_error", "timeout", "not_hello"];

/// How a session's leader changes ended, in the order of `TransportMetrics::reattaches`.
pub const REATTACH_RESULTS: [&str; 2] = ["attached", "closed"];

const ERROR_CODES: usize = ErrorCode::ALL.len();

/// Why a connection was refused at accept, in the order of `ListenerMetrics::refused`.
pub const REFUSAL_REASONS: [&str; 3] = [
    "connections_max",
    "connections_per_ip_max",
    "tls_handshakes_per_ip",
];
/// What an HTTP connection can run out of time for, in the order of
/// `ListenerMetrics::timeouts`.
pub const TIMEOUT_PHASES: [&str; 3] = ["header", "body", "tls_handshake"];

/// Registers handles on a recorder, or hands out no-op handles when metrics are off.
struct Registrar<'a> {
    recorder: Option<&'a PrometheusRecorder>,
}

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.clone()))
                .collect::<Vec<_>>(),
        )
    }

    fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Counter {
        let Some(r) = self.recorder else {
            return Counter::noop();
        };
        r.describe_counter(KeyName::from(name), None, help.into());
        r.register_counter(&Self::key(name, labels), &METADATA)
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Gauge {
        let Some(r) = self.recorder else {
            return Gauge::noop();
        };
        r.describe_gauge(KeyName::from(name), None, help.into());
        r.register_gauge(&Self::key(name, labels), &METADATA)
    }

    fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Histogram {
        let Some(r) = self.recorder else {
            return Histogram::noop();
        };
        r.describe_histogram(KeyName::from(name), None, help.into());
        r.register_histogram(&Self::key(name, labels), &METADATA)
    }
}

/// Series of one transport (label `transport`: `ws` or `quic`).
fn transport_metrics(r: &Registrar<'_>, transport: &'static str) -> TransportMetrics {
    let t = || vec![("transport", transport.to_string())];
    TransportMetrics {
        sessions_open: r.gauge("fabric_sessions_open", "Sessions open now.", &t()),
        sessions_opened: r.counter("fabric_sessions_opened_total", "Sessions accepted.", &t()),
        frames_in: r.counter("fabric_frames_in_total", "Frames read from clients.", &t()),
        frames_out: r.counter(
            "fabric_frames_out_total",
            "Frames written to clients.",
            &t(),
        ),
        bytes_in: r.counter(
            "fabric_frame_in_bytes_total",
            "Frame bytes read from clients.",
            &t(),
        ),
        bytes_out: r.counter(
            "fabric_frame_out_bytes_total",
            "Frame bytes written to clients.",
            &t(),
        ),
        errors: error_counters(r, transport),
        hello_failures: HELLO_FAILURE_REASONS.map(|reason| {
            r.counter(
                "fabric_hello_failures_total",
                "Sessions that ended without a welcome, by reason.",
                &[("transport", transport.into()), ("reason", reason.into())],
            )
        }),
        reattaches: REATTACH_RESULTS.map(|result| {
            r.counter(
                "fabric_session_reattaches_total",
                "Sessions taken up at a shard's new leader after a leader change, or closed \
                 because none took them up in time.",
                &[("transport", transport.into()), ("result", result.into())],
            )
        }),
        refused_overloaded: r.counter(
            "fabric_requests_refused_total",
            "Requests refused by backpressure (overloaded: over the in-flight limit).",
            &[
                ("transport", transport.into()),
                ("reason", "overloaded".into()),
            ],
        ),
        ack_latency: r.histogram(
            "fabric_ack_latency_seconds",
            "Request received to its answer sent (ok or error), seconds.",
            &t(),
        ),
    }
}

/// Sessions of one transport (`ws` or `quic`).
pub struct TransportMetrics {
    pub sessions_open: Gauge,
    pub sessions_opened: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// By `ErrorCode::ALL` order.
    pub errors: [Counter; ERROR_CODES],
    /// By [`HELLO_FAILURE_REASONS`] order.
    pub hello_failures: [Counter; 4],
    /// By [`REATTACH_RESULTS`] order.
    pub reattaches: [Counter; 2],
    pub refused_overloaded: Counter,
    /// Request read from the socket to its answer flushed to the socket.
    pub ack_latency: Histogram,
}

/// One listening port (label `listener`: `http` for the HTTP/WebSocket port, `quic`,
/// `metrics` for `metrics_listen`).
pub struct ListenerMetrics {
    pub open: Gauge,
    /// By [`REFUSAL_REASONS`] order.
    pub refused: [Counter; 3],
    /// By [`TIMEOUT_PHASES`] order (no-ops for QUIC).
    pub timeouts: [Counter; 3],
}

fn listener_metrics(r: &Registrar<'_>, listener: &'static str, http: bool) -> ListenerMetrics {
    ListenerMetrics {
        open: r.gauge(
            "fabric_connections_open",
            "Connections open now (an upgraded WebSocket counts as its connection).",
            &[("listener", listener.into())],
        ),
        refused: REFUSAL_REASONS.map(|reason| {
            r.counter(
                "fabric_connections_refused_total",
                "Connections refused at accept, by reason.",
                &[("listener", listener.into()), ("reason", reason.into())],
            )
        }),
        timeouts: TIMEOUT_PHASES.map(|phase| {
            if !http {
                return Counter::noop();
            }
            r.counter(
                "fabric_http_timeouts_total",
                "HTTP connections closed (header, tls_handshake) or answered 408 (body) for taking too long.",
                &[("listener", listener.into()), ("phase", phase.into())],
            )
        }),
    }
}

/// The REST API.
pub struct HttpMetrics {
    pub errors: [Counter; ERROR_CODES],
    /// Request received to response ready, for appends.
    pub ack_latency: Histogram,
}

/// One shard (label `shard`).
pub struct ShardMetrics {
    pub records: Counter,
    pub written_bytes: Counter,
    pub fsync_seconds: Histogram,
    pub commit_records: Histogram,
    pub commit_bytes: Histogram,
    pub segments: Gauge,
    pub wal_bytes: Gauge,
    pub durable_lsn: Gauge,
    pub recovery_seconds: Gauge,
    pub recovered_records: Gauge,
    pub segments_deleted: Counter,
    pub retention_blocked: Counter,
    pub log_reads: Counter,
    pub log_read_bytes: Counter,
    pub key_lookups: Counter,
    pub sends_acked: Counter,
    pub appends_acked: Counter,
    pub deliveries: Counter,
    pub redeliveries: Counter,
    pub events_pushed: Counter,
    pub backlog_sum: Gauge,
    pub backlog_max: Gauge,
    pub backlog_truncated: Gauge,
    pub queue_full: Counter,
    pub restarts: Counter,
    pub ready: Gauge,
}

/// One opted-in mesh (label `mesh`).
pub struct MeshMetrics {
    pub mesh: Arc<str>,
    pub durable_pos: Gauge,
    pub peers: Gauge,
    pub sessions: Gauge,
    pub backlog_sum: Gauge,
    pub backlog_max: Gauge,
}

/// Every metric of one node.
pub struct Metrics {
    handle: Option<PrometheusHandle>,
    /// Kept to register series found at run time (a peer that joined the cluster).
    recorder: Option<PrometheusRecorder>,
    pub ws: TransportMetrics,
    pub quic: TransportMetrics,
    pub http: HttpMetrics,
    pub shards: Vec<ShardMetrics>,
    pub meshes: Vec<MeshMetrics>,
    /// The HTTP/WebSocket port, QUIC, and the metrics port.
    pub http_port: ListenerMetrics,
    pub quic_port: ListenerMetrics,
    pub metrics_port: ListenerMetrics,
    ready: Gauge,
    /// A clustered node's Raft and node-link series.
    raft: Option<raft::RaftMetrics>,
}

impl Metrics {
    /// The series of transport `name` (`ws` or `quic`).
    pub fn transport(&self, name: &str) -> &TransportMetrics {
        match name {
            "quic" => &self.quic,
            _ => &self.ws,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot configure the metrics exporter: {0}")]
    Build(String),
}

impl Metrics {
    /// Builds this node's recorder (when `enabled`) and registers every series of a node
    /// outside a cluster.
    pub fn new(enabled: bool, shards: u32, meshes: &[String]) -> Result<Metrics, MetricsError> {
        Self::with_cluster(enabled, shards, meshes, None)
    }

    /// As [`Metrics::new`], plus the Raft and node-link series of a clustered node.
    // Over 70 lines: it registers every handle the node exports, one after another: a list, not
    // logic.
    pub fn with_cluster(
        enabled: bool,
        shards: u32,
        meshes: &[String],
        cluster: Option<&raft::ClusterLabels>,
    ) -> Result<Metrics, MetricsError> {
        let recorder = if enabled {
            let mut b = PrometheusBuilder::new();
            for (m, buckets) in [
                (Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS),
                (
                    Matcher::Full("fabric_wal_commit_records".into()),
                    COMMIT_RECORDS_BUCKETS,
                ),
                (
                    Matcher::Full("fabric_wal_commit_bytes".into()),
                    COMMIT_BYTES_BUCKETS,
                ),
            ] {
                b = b
                    .set_buckets_for_metric(m, buckets)
                    .map_err(|e| MetricsError::Build(e.to_string()))?;
            }
            Some(b.build_recorder())
        } else {
            None
        };
        let r = Registrar {
            recorder: recorder.as_ref(),
        };
        let ws = transport_metrics(&r, "ws");
        let quic = transport_metrics(&r, "quic");
        let raft = cluster.map(|c| raft::RaftMetrics::register(&r, shards, c));
        let http = HttpMetrics {
            errors: error_counters(&r, "http"),
            ack_latency: r.histogram(
                "fabric_ack_latency_seconds",
                "Request received to its answer sent (ok or error), seconds.",
                &[("transport", "http".into())],
            ),
        };
        let shards = (0..shards)
            .map(|i| {
                let l = [("shard", i.to_string())];
                ShardMetrics {
                    records: r.counter("fabric_wal_records_total", "WAL records written and synced.", &l),
                    written_bytes: r.counter("fabric_wal_written_bytes_total", "WAL bytes written and synced.", &l),
                    fsync_seconds: r.histogram("fabric_wal_fsync_seconds", "fdatasync duration of one group commit, seconds.", &l),
                    commit_records: r.histogram("fabric_wal_commit_records", "WAL records per group commit.", &l),
                    commit_bytes: r.histogram("fabric_wal_commit_bytes", "WAL bytes per group commit.", &l),
                    segments: r.gauge("fabric_wal_segments", "WAL segment files.", &l),
                    wal_bytes: r.gauge("fabric_wal_bytes", "Bytes in the shard's WAL segments.", &l),
                    durable_lsn: r.gauge("fabric_wal_durable_lsn", "Last durable WAL record number (the shard's head position).", &l),
                    recovery_seconds: r.gauge("fabric_wal_recovery_seconds", "Duration of the shard's last recovery, seconds.", &l),
                    recovered_records: r.gauge("fabric_wal_recovered_records", "Records read by the shard's last recovery.", &l),
                    segments_deleted: r.counter("fabric_wal_segments_deleted_total", "Segments retired by retention.", &l),
                    retention_blocked: r.counter("fabric_wal_retention_blocked_total", "Retention rounds held back by unacknowledged inbox data.", &l),
                    log_reads: r.counter("fabric_log_reads_total", "Disk reads of the log (conversation entries older than the log cache).", &l),
                    log_read_bytes: r.counter("fabric_log_read_bytes_total", "Bytes of disk reads of the log.", &l),
                    key_lookups: r.counter("fabric_key_lookups_total", "Keyed appends whose key was looked up in a sealed segment on disk.", &l),
                    sends_acked: r.counter("fabric_sends_acked_total", "Inbox sends acknowledged (durable).", &l),
                    appends_acked: r.counter("fabric_appends_acked_total", "Conversation appends acknowledged (durable).", &l),
                    deliveries: r.counter("fabric_inbox_deliveries_total", "Inbox messages pushed to sessions.", &l),
                    redeliveries: r.counter("fabric_inbox_redeliveries_total", "Inbox messages pushed again to a peer (reconnect before ack).", &l),
                    events_pushed: r.counter("fabric_conversation_events_pushed_total", "Conversation events pushed to subscribers.", &l),
                    backlog_sum: r.gauge("fabric_inbox_backlog_messages", "Unacknowledged inbox messages, summed over peers.", &l),
                    backlog_max: r.gauge("fabric_inbox_backlog_max_messages", "The largest single peer's unacknowledged inbox messages.", &l),
                    backlog_truncated: r.gauge(
                        "fabric_inbox_backlog_truncated",
                        "1 when the backlog walk hit its budget and the backlog gauges are lower bounds.",
                        &l,
                    ),
                    queue_full: r.counter("fabric_shard_queue_full_total", "Request batches that waited because the shard's queue was full (backpressure).", &l),
                    restarts: r.counter("fabric_shard_restarts_total", "Shard restarts by its supervisor.", &l),
                    ready: r.gauge("fabric_shard_ready", "1 while the shard serves writes.", &l),
                }
            })
            .collect();
        let meshes = meshes
            .iter()
            .map(|m| {
                let l = [("mesh", m.clone())];
                MeshMetrics {
                    mesh: m.as_str().into(),
                    durable_pos: r.gauge(
                        "fabric_mesh_inbox_position",
                        "The mesh's last durable inbox position.",
                        &l,
                    ),
                    peers: r.gauge("fabric_mesh_peers", "Peers in the mesh.", &l),
                    sessions: r.gauge(
                        "fabric_mesh_sessions",
                        "Sessions attached to the mesh's inboxes.",
                        &l,
                    ),
                    backlog_sum: r.gauge(
                        "fabric_mesh_inbox_backlog_messages",
                        "Unacknowledged inbox messages in the mesh.",
                        &l,
                    ),
                    backlog_max: r.gauge(
                        "fabric_mesh_inbox_backlog_max_messages",
                        "The mesh's largest single peer backlog.",
                        &l,
                    ),
                }
            })
            .collect();
        let build = r.gauge(
            "fabric_build_info",
            "Always 1; labels name the build.",
            &[
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("commit", env!("FABRIC_GIT_COMMIT").into()),
            ],
        );
        build.set(1.0);
        let ready = r.gauge(
            "fabric_ready",
            "1 while the node is ready to serve writes (as /readyz).",
            &[],
        );
        let http_port = listener_metrics(&r, "http", true);
        let quic_port = listener_metrics(&r, "quic", false);
        let metrics_port = listener_metrics(&r, "metrics", true);
        Ok(Metrics {
            handle: recorder.as_ref().map(|r| r.handle()),
            recorder,
            ws,
            quic,
            http,
            shards,
            meshes,
            http_port,
            quic_port,
            metrics_port,
            ready,
            raft,
        })
    }

    pub fn enabled(&self) -> bool {
        self.handle.is_some()
    }

    /// Folds recorded histogram samples into their buckets (the exporter keeps raw samples
    /// until then).
    pub fn upkeep(&self) {
        if let Some(h) = &self.handle {
            h.run_upkeep();
        }
    }

    /// The Prometheus text exposition, or `None` when metrics are off. `ready`, the shard
    /// restart counts and a clustered node's figures are read by the caller at scrape time.
    pub fn render(
        &self,
        ready: bool,
        shards: &[(bool, u64)],
        cluster: Option<&raft::ClusterScrape>,
    ) -> Option<String> {
        let handle = self.handle.as_ref()?;
        self.ready.set(if ready { 1.0 } else { 0.0 });
        for (m, (ready, restarts)) in self.shards.iter().zip(shards) {
            m.ready.set(if *ready { 1.0 } else { 0.0 });
            m.restarts.absolute(*restarts);
        }
        let cluster = cluster.filter(|_| self.raft.is_some());
        if let (Some(m), Some(c)) = (&self.raft, cluster) {
            let r = Registrar {
                recorder: self.recorder.as_ref(),
            };
            m.set(&r, c);
        }
        let mut out = handle.render();
        if let Some(c) = cluster {
            raft::render_lag(&mut out, &c.replicas);
        }
        render_process(&mut out);
        render_logging(&mut out);
        Some(out)
    }
}

fn error_counters(r: &Registrar<'_>, transport: &'static str) -> [Counter; ERROR_CODES] {
    ErrorCode::ALL.map(|code| {
        r.counter(
            "fabric_errors_sent_total",
            "Error answers sent to clients, by stable error code.",
            &[
                ("transport", transport.into()),
                ("code", code.as_str().into()),
            ],
        )
    })
}

/// Logging's process-wide counters (`crate::logging::STATS`): logging is set up once per
/// process, before any node's recorder exists.
fn render_logging(out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &crate::logging::STATS;
    for (name, help, value) in [
        (
            "fabric_log_write_errors_total",
            "Log lines whose write to stderr failed (the node goes on).",
            s.write_errors.load(Relaxed),
        ),
        (
            "fabric_log_lines_dropped_total",
            "Log lines dropped because stderr did not keep up with the log queue.",
            s.lines_dropped.load(Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    }
}

/// Process figures read from /proc/self at scrape time (Linux). Rendered here rather than
/// through the facade because CPU seconds are fractional and `metrics` counters are integers.
fn render_process(out: &mut String) {
    #[cfg(target_os = "linux")]
    {
        let Some(p) = read_process() else { return };
        let mut line = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        line(
            "fabric_process_cpu_seconds_total",
            "counter",
            "User and system CPU time, seconds.",
            p.cpu_seconds,
        );
        line(
            "fabric_process_resident_memory_bytes",
            "gauge",
            "Resident memory, bytes.",
            p.resident_bytes,
        );
        line(
            "fabric_process_open_fds",
            "gauge",
            "Open file descriptors.",
            p.open_fds,
        );
        line(
            "fabric_process_max_fds",
            "gauge",
            "Limit on open file descriptors.",
            p.max_fds,
        );
        line(
            "fabric_process_start_time_seconds",
            "gauge",
            "Process start, seconds since the Unix epoch.",
            p.start_time_seconds,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

#[cfg(target_os = "linux")]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    start_time_seconds: f64,
}

#[cfg(target_os = "linux")]
fn read_process() -> Option<ProcessFigures> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    if ticks <= 0.0 || page <= 0.0 {
        return None;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field numbers of proc(5), minus 3 (the first two fields precede ')' and we count from 0).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let cpu = (field(14)? + field(15)?) / ticks;
    let start_ticks = field(22)?;
    let rss_pages = field(24)?;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as f64;
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    Some(ProcessFigures {
        cpu_seconds: cpu,
        resident_bytes: rss_pages * page,
        open_fds,
        max_fds,
        start_time_seconds: boot + start_ticks / ticks,
    })
}

/// Exports one session's counters: deltas of its core's `SessionStats` since the last call,
/// and answer latencies. Requests are paired with answers in order (the core counts both), in
/// cohorts that share a read time, so timing costs nothing per request in the core.
#[derive(Default)]
pub struct SessionExport {
    last: SessionStats,
    /// (requests, when they were read), oldest first; at most the session's in-flight requests.
    cohorts: VecDeque<(u64, Instant)>,
}

impl SessionExport {
    /// After frames were read and handled: counters, and the new requests' read time.
    pub fn requests_in(&mut self, m: &TransportMetrics, stats: &SessionStats, now: Instant) {
        let last = &mut self.last;
        let add = |c: &Counter, new: u64, old: &mut u64| {
            if new > *old {
                c.increment(new - *old);
                *old = new;
            }
        };
        add(&m.frames_in, stats.frames_in, &mut last.frames_in);
        add(&m.bytes_in, stats.bytes_in, &mut last.bytes_in);
        add(&m.frames_out, stats.frames_out, &mut last.frames_out);
        add(&m.bytes_out, stats.bytes_out, &mut last.bytes_out);
        if stats.errors_sent != last.errors_sent {
            last.errors_sent = stats.errors_sent;
            for (i, c) in m.errors.iter().enumerate() {
                add(c, stats.errors_by_code[i], &mut last.errors_by_code[i]);
            }
        }
        add(
            &m.hello_failures[0],
            stats.hellos_refused,
            &mut last.hellos_refused,
        );
        add(
            &m.hello_failures[1],
            stats.hellos_failed,
            &mut last.hellos_failed,
        );
        add(
            &m.hello_failures[2],
            stats.hellos_timed_out,
            &mut last.hellos_timed_out,
        );
        add(
            &m.hello_failures[3],
            stats.ops_before_hello,
            &mut last.ops_before_hello,
        );
        add(
            &m.refused_overloaded,
            stats.refused_overloaded,
            &mut last.refused_overloaded,
        );
        add(&m.reattaches[0], stats.reattached, &mut last.reattached);
        add(
            &m.reattaches[1],
            stats.reattach_failed,
            &mut last.reattach_failed,
        );
        if stats.requests_counted > last.requests_counted {
            let n = stats.requests_counted - last.requests_counted;
            last.requests_counted = stats.requests_counted;
            match self.cohorts.back_mut() {
                Some((count, at)) if *at == now => *count += n,
                _ => self.cohorts.push_back((n, now)),
            }
        }
    }

    /// After answers were flushed to the socket: their latencies.
    pub fn answers_out(&mut self, m: &TransportMetrics, stats: &SessionStats, now: Instant) {
        let mut n = stats
            .requests_answered
            .saturating_sub(self.last.requests_answered);
        self.last.requests_answered = stats.requests_answered;
        while n > 0 {
            let Some((count, at)) = self.cohorts.front_mut() else {
                break;
            };
            let take = n.min(*count);
            m.ack_latency.record_many(
                now.saturating_duration_since(*at).as_secs_f64(),
                take as usize,
            );
            *count -= take;
            n -= take;
            if *count == 0 {
                self.cohorts.pop_front();
            }
        }
    }
}

/// Exports one shard incarnation's counters and gauges from its core.
pub struct ShardExport {
    last: ShardStats,
    last_refresh: Option<Instant>,
    /// Something changed since the last refresh of the walking gauges.
    pub refresh_pending: bool,
}

impl ShardExport {
    /// Starts from the shard's current figures (a recovered shard's are not new work).
    pub fn new(shard: &Shard) -> ShardExport {
        ShardExport {
            last: shard.stats().clone(),
            last_refresh: None,
            refresh_pending: true,
        }
    }

    /// Once per loop iteration: counter deltas and the cheap gauges; the walking gauges when
    /// they are due.
    pub fn export(
        &mut self,
        shard: &Shard,
        m: &ShardMetrics,
        meshes: &[MeshMetrics],
        now: Instant,
    ) {
        let s = shard.stats();
        let last = &mut self.last;
        let mut changed = false;
        let mut add = |c: &Counter, new: u64, old: &mut u64| {
            if new > *old {
                c.increment(new - *old);
                *old = new;
                changed = true;
            }
        };
        add(&m.sends_acked, s.sends_acked, &mut last.sends_acked);
        add(&m.appends_acked, s.appends_acked, &mut last.appends_acked);
        add(&m.deliveries, s.deliveries, &mut last.deliveries);
        add(&m.redeliveries, s.redeliveries, &mut last.redeliveries);
        add(&m.events_pushed, s.events_pushed, &mut last.events_pushed);
        add(
            &m.segments_deleted,
            s.segments_deleted,
            &mut last.segments_deleted,
        );
        add(
            &m.retention_blocked,
            s.retention_blocked,
            &mut last.retention_blocked,
        );
        add(&m.log_reads, s.disk_reads, &mut last.disk_reads);
        add(
            &m.log_read_bytes,
            s.disk_read_bytes,
            &mut last.disk_read_bytes,
        );
        add(&m.key_lookups, s.key_lookups, &mut last.key_lookups);
        // Acks move cursors without changing any counter above.
        if s.records_written != last.records_written {
            last.records_written = s.records_written;
            changed = true;
        }
        if changed {
            self.refresh_pending = true;
            m.segments.set(shard.segment_count() as f64);
            m.wal_bytes.set(shard.wal_bytes() as f64);
            m.durable_lsn.set(shard.durable_lsn() as f64);
        }
        if self.refresh_pending && self.refresh_due(now).is_none() {
            self.refresh(shard, m, meshes, now);
        }
    }

    /// When the walking gauges may next be refreshed, if that is not now.
    pub fn refresh_due(&self, now: Instant) -> Option<Instant> {
        let next = self.last_refresh? + Duration::from_millis(REFRESH_INTERVAL_MS);
        (next > now).then_some(next)
    }

    /// Backlog and per-mesh gauges (they walk peers).
    pub fn refresh(
        &mut self,
        shard: &Shard,
        m: &ShardMetrics,
        meshes: &[MeshMetrics],
        now: Instant,
    ) {
        self.refresh_pending = false;
        self.last_refresh = Some(now);
        let b = shard.inbox_backlog_scan(BACKLOG_SCAN_ENTRIES_MAX);
        m.backlog_sum.set(b.sum as f64);
        m.backlog_max.set(b.max as f64);
        m.backlog_truncated.set(if b.truncated { 1.0 } else { 0.0 });
        m.segments.set(shard.segment_count() as f64);
        m.wal_bytes.set(shard.wal_bytes() as f64);
        m.durable_lsn.set(shard.durable_lsn() as f64);
        for mm in meshes {
            if let Some(s) = shard.mesh_stats(&mm.mesh, BACKLOG_SCAN_ENTRIES_MAX) {
                mm.durable_pos.set(s.durable_pos as f64);
                mm.peers.set(s.peers as f64);
                mm.sessions.set(s.sessions as f64);
                mm.backlog_sum.set(s.backlog.sum as f64);
                mm.backlog_max.set(s.backlog.max as f64);
            }
        }
    }
}

/// One group commit's figures.
pub fn record_commit(m: &ShardMetrics, records: u64, bytes: usize, fsync: Duration) {
    m.records.increment(records);
    m.written_bytes.increment(bytes as u64);
    m.fsync_seconds.record(fsync.as_secs_f64());
    m.commit_records.record(records as f64);
    m.commit_bytes.record(bytes as f64);
}
