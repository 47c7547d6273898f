//! `fabric cluster local`: a cluster's nodes as child processes of this one, for development.
//!
//! It runs [`init`] first if the directory has no `node-1.toml`, then starts `fabric serve
//! --config D/node-<i>.toml` for each node (this same executable), each in a process group of
//! its own, and prints every line a node writes prefixed with `[node <i>]` (stdout to stdout,
//! stderr to stderr). On SIGINT (Ctrl-C), SIGTERM or SIGHUP it sends SIGTERM to every node and
//! waits for them, SIGKILLing one that has not exited after [`STOP_TIMEOUT`]. A node that
//! exits by itself is reported with its status and the others are stopped the same way.
//!
//! The variables that would override what the configs set ([`CLEARED_VARIABLES`]:
//! `FABRIC_CONFIG`, `FABRIC_DATA_DIR`, the three listen addresses, `FABRIC_SHARDS`,
//! `FABRIC_ADMIN_TOKEN`) are not passed to the nodes: each node runs its config as written.

use super::init::{self, InitError, InitOptions};
use crate::config::{Config, ConfigError};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

/// How long a node has to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Variables `fabric serve` reads that the configs `init` writes set: removed from the nodes'
/// environment so that each runs its config as written.
pub const CLEARED_VARIABLES: [&str; 7] = [
    "FABRIC_CONFIG",
    "FABRIC_DATA_DIR",
    "FABRIC_LISTEN",
    "FABRIC_QUIC_LISTEN",
    "FABRIC_METRICS_LISTEN",
    "FABRIC_SHARDS",
    "FABRIC_ADMIN_TOKEN",
];

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        source: Box<ConfigError>,
    },
    #[error("{dir} holds a cluster of {found} nodes (see node-1.toml), not {asked}")]
    NodeCount {
        dir: PathBuf,
        found: usize,
        asked: u32,
    },
    #[error("{0} has no [cluster] section")]
    NotCluster(PathBuf),
    #[error("{path} is node {found}'s config, not node {expected}'s")]
    OtherNode {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// How a local cluster ended; every node has exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEnd {
    pub cause: EndCause,
    /// Each node's exit, in the order they exited.
    pub exits: Vec<NodeExit>,
}

/// What stopped a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    /// The stop future (a signal: its name).
    Stopped(String),
    /// Node `node` exited by itself with `status`; the others were stopped.
    NodeExited { node: u64, status: String },
}

/// One node's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeExit {
    pub node: u64,
    /// Its exit status as text (`exit status: 0`, `signal: 9 (SIGKILL)`).
    pub status: String,
    /// It exited before it was asked to stop.
    pub by_itself: bool,
    /// It was still running `stop_timeout` after SIGTERM, and was sent SIGKILL.
    pub killed: bool,
}

/// A line of this command's own, on stdout.
/// Runtime threads for each of `nodes` nodes on this machine: its cores split evenly, at
/// least one each (three nodes on two cores run one each; one thread per node also saves the
/// wake-ups between a node's own threads).
pub fn worker_threads_share(nodes: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nodes.max(1) as usize).max(1)
}

fn say(args: std::fmt::Arguments<'_>) {
    crate::logging::say(format_args!("fabric cluster local: {args}"));
}

/// Writes `[node <node>] <line>` to stdout or stderr; a failed write is dropped (the node
/// keeps running and its output keeps being read).
fn print_line(node: u64, line: &[u8], to_stderr: bool) {
    use std::io::Write;
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    let _ = if to_stderr {
        writeln!(std::io::stderr().lock(), "[node {node}] {text}")
    } else {
        writeln!(std::io::stdout().lock(), "[node {node}] {text}")
    };
}

/// Forwards `from`'s lines, prefixed, until it ends.
async fn forward(node: u64, from: impl AsyncRead + Unpin, to_stderr: bool) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => print_line(node, &line, to_stderr),
        }
    }
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) has no memory effects. `pid` is a child not yet reaped (its `wait`
    // has not completed), so the id is still its own.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Waits for `child` to exit, or for a stop request: then SIGTERM, and SIGKILL after
/// `stop_timeout`. Reports the exit on `exits`.
async fn supervise(
    node: u64,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
    stop_timeout: Duration,
    exits: mpsc::UnboundedSender<NodeExit>,
) {
    let pid = child.id();
    tokio::select! {
        status = child.wait() => {
            let status = status_text(&status);
            let _ = exits.send(NodeExit { node, status, by_itself: true, killed: false });
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    if let Some(pid) = pid {
        sigterm(pid);
    }
    let (status, killed) = match tokio::time::timeout(stop_timeout, child.wait()).await {
        Ok(status) => (status, false),
        Err(_) => {
            let _ = child.start_kill();
            (child.wait().await, true)
        }
    };
    let _ = exits.send(NodeExit {
        node,
        status: status_text(&status),
        by_itself: false,
        killed,
    });
}

fn status_text(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}

/// Loads and validates each node's config in `dir` and checks they make a cluster of `nodes`
/// (`node-<i>.toml` is node i's).
fn load_configs(dir: &Path, nodes: u32) -> Result<Vec<PathBuf>, LocalError> {
    let mut paths = Vec::new();
    for i in 1..=u64::from(nodes) {
        let path = init::config_path(dir, i);
        let config = Config::from_toml_file(&path)
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|source| LocalError::Config {
                path: path.clone(),
                source: Box::new(source),
            })?;
        let Some(cluster) = config.cluster else {
            return Err(LocalError::NotCluster(path));
        };
        if cluster.node != i {
            return Err(LocalError::OtherNode {
                path,
                found: cluster.node,
                expected: i,
            });
        }
        if cluster.members.len() != nodes as usize {
            return Err(LocalError::NodeCount {
                dir: dir.to_path_buf(),
                found: cluster.members.len(),
                asked: nodes,
            });
        }
        paths.push(path);
    }
    Ok(paths)
}

/// The signals that stop a local cluster: SIGINT, SIGTERM, SIGHUP. Listening starts when it
/// is made (inside a tokio runtime); from then on they no longer end this process.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> Result<Signals, LocalError> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|source| LocalError::Io {
                what: format!("listen for {name}"),
                source,
            })
        };
        Ok(Signals {
            int: listen(SignalKind::interrupt(), "SIGINT")?,
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            hup: listen(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The name of the next signal.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Runs a local cluster of `o.nodes` nodes in `o.dir` with the executable `exe` (`fabric`),
/// until `stop` completes (`fabric cluster local` passes [`Signals::recv`]; its output names
/// the cause) or a node exits by itself; then stops every node (SIGTERM, SIGKILL after
/// `stop_timeout`; the command uses [`STOP_TIMEOUT`]) and returns once all have exited. `init`
/// runs first if `o.dir` has no `node-1.toml`; otherwise `o.base_port`, `o.shards`, `o.force`
/// and `o.admin_token` are unused.
pub async fn run(
    o: &InitOptions,
    exe: &Path,
    stop_timeout: Duration,
    stop: impl std::future::Future<Output = String>,
) -> Result<LocalEnd, LocalError> {
    if init::config_path(&o.dir, 1).exists() {
        say(format_args!(
            "using the cluster in {} (--base-port and --shards apply to a new one only)",
            o.dir.display()
        ));
    } else {
        let done = init::init(o)?;
        crate::logging::say(format_args!("{}", done.summary().trim_end()));
    }
    let configs = load_configs(&o.dir, o.nodes)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0usize;
    let mut spawn_error = None;
    for (i, path) in configs.iter().enumerate() {
        let node = i as u64 + 1;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A signal to this command's group (Ctrl-C) reaches the nodes only through it.
            .process_group(0)
            .kill_on_drop(true);
        for v in CLEARED_VARIABLES {
            cmd.env_remove(v);
        }
        // The nodes share this machine: each takes its share of the cores, unless its file
        // says otherwise.
        let set =
            crate::config::Config::from_toml_file(path).is_ok_and(|c| c.worker_threads.is_some());
        if !set {
            cmd.arg("--worker-threads")
                .arg(worker_threads_share(o.nodes).to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                spawn_error = Some(LocalError::Io {
                    what: format!("start node {node} ({} serve)", exe.display()),
                    source,
                });
                break;
            }
        };
        say(format_args!(
            "node {node} started (pid {}): {} serve --config {}",
            child.id().unwrap_or(0),
            exe.display(),
            path.display()
        ));
        if let Some(out) = child.stdout.take() {
            tasks.spawn(forward(node, out, false));
        }
        if let Some(err) = child.stderr.take() {
            tasks.spawn(forward(node, err, true));
        }
        tasks.spawn(supervise(
            node,
            child,
            stop_rx.clone(),
            stop_timeout,
            exit_tx.clone(),
        ));
        started += 1;
    }
    drop(exit_tx);

    let mut cause = EndCause::Stopped("start failed".into());
    let mut exits = Vec::new();
    if spawn_error.is_none() {
        tokio::select! {
            why = stop => {
                say(format_args!("{why}: stopping {started} nodes"));
                cause = EndCause::Stopped(why);
            }
            Some(exit) = exit_rx.recv() => {
                say(format_args!(
                    "node {} exited by itself ({}); stopping the others",
                    exit.node, exit.status
                ));
                cause = EndCause::NodeExited { node: exit.node, status: exit.status.clone() };
                exits.push(exit);
            }
        }
    }
    let _ = stop_tx.send(true);
    while exits.len() < started {
        let Some(exit) = exit_rx.recv().await else {
            break;
        };
        let (node, status) = (exit.node, &exit.status);
        match (exit.by_itself, exit.killed) {
            (_, true) => say(format_args!(
                "node {node} did not stop within {} ms: killed ({status})",
                stop_timeout.as_millis()
            )),
            (true, false) => say(format_args!("node {node} exited ({status})")),
            (false, false) => say(format_args!("node {node} stopped ({status})")),
        }
        exits.push(exit);
    }
    // The output of the nodes that have exited ends with them.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    match spawn_error {
        Some(e) => Err(e),
        None => Ok(LocalEnd { cause, exits }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable shell script at `dir/name` with `body`; it stands in for `fabric`, run
    /// as `<script> serve --config <path>`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_node_that_exits_by_itself_stops_the_others_and_one_that_ignores_sigterm_is_killed() {
        // Proves that when node 1 exits by itself (status 3) the run ends with it as the
        // cause, nodes 2 and 3 are sent SIGTERM, and since they ignore SIGTERM they are
        // SIGKILLed after the stop timeout; the run returns only once all have exited, after
        // init wrote the directory.
        let tmp = tempfile::tempdir().unwrap();
        let exe = script(
            tmp.path(),
            "fake-fabric",
            "case \"$3\" in\n\
             *node-1.toml) sleep 0.3; exit 3 ;;\n\
             *) trap '' TERM; while :; do sleep 0.05; done ;;\n\
             esac",
        );
        let mut o = InitOptions::new(3, tmp.path().join("c"));
        o.base_port = 30000;
        let started = std::time::Instant::now();
        let end = runtime()
            .block_on(run(
                &o,
                &exe,
                Duration::from_millis(300),
                std::future::pending(),
            ))
            .unwrap();
        assert!(tmp.path().join("c/node-1.toml").exists());
        assert_eq!(
            end.cause,
            EndCause::NodeExited {
                node: 1,
                status: "exit status: 3".into()
            }
        );
        assert_eq!(end.exits.len(), 3);
        for other in &end.exits[1..] {
            assert!(!other.by_itself && other.killed, "{other:?}");
            assert!(other.status.contains("SIGKILL"), "{other:?}");
        }
        assert!(started.elapsed() >= Duration::from_millis(600));
    }

    #[test]
    fn the_stop_future_stops_every_node_with_sigterm() {
        // Proves that when the stop future completes (a signal, in the command) every node is
        // sent SIGTERM and the run returns that cause once all have exited, none killed; and
        // that a directory whose configs make another cluster size is refused.
        let tmp = tempfile::tempdir().unwrap();
        let exe = script(tmp.path(), "fake-fabric", "while :; do sleep 0.05; done");
        let mut o = InitOptions::new(3, tmp.path().join("c"));
        o.base_port = 30100;
        let stop = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "SIGTERM".to_string()
        };
        let end = runtime()
            .block_on(run(&o, &exe, Duration::from_secs(10), stop))
            .unwrap();
        assert_eq!(end.cause, EndCause::Stopped("SIGTERM".into()));
        let mut nodes: Vec<u64> = end.exits.iter().map(|e| e.node).collect();
        nodes.sort();
        assert_eq!(nodes, [1, 2, 3]);
        for e in &end.exits {
            assert!(!e.by_itself && !e.killed, "{e:?}");
            assert!(e.status.contains("SIGTERM"), "{e:?}");
        }
        o.nodes = 2;
        let e = runtime()
            .block_on(run(
                &o,
                &exe,
                Duration::from_secs(1),
                std::future::pending(),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("a cluster of 3 nodes"), "{e}");
    }
}
