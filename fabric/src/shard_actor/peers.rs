//! A replicated shard's traffic with its replicas on other nodes: the frames its driver sends
//! (through the node link, behind [`NodeSender`]), the frames that arrive for it, and the
//! leader's log reads, which read whole segments and so run on the blocking pool.

use fabric_proto::internal::ShardIdx;
use fabric_router::host::{LogReadEffect, NodeFrame};
use fabric_shard::raft::{Entry, LogReadError, NodeId};
use fabric_shard::replica::ReplicaConfig;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Frames for one shard from other nodes, queued for its host (beyond this, the node link's
/// reader waits: backpressure onto the link, not buffering).
pub const NODE_INBOUND_FRAMES_MAX: usize = 1_024;
/// Log reads a leader's host runs at once (each reads whole segments); more wait.
pub const LOG_READS_RUNNING_MAX: usize = 4;

/// Where a shard's frames for other nodes go (the node link; a test's in-process wire).
pub trait NodeSender: Send + Sync {
    /// Queues `frame` for the replica of `shard` on node `to`; never blocks. False if it was
    /// dropped (a full queue, a node not connected): Raft repeats what is lost.
    fn send(&self, to: NodeId, shard: ShardIdx, frame: NodeFrame) -> bool;
}

/// What makes a shard slot one replica of its group.
pub struct SlotReplication {
    pub config: ReplicaConfig,
    pub sender: Arc<dyn NodeSender>,
    /// Frames for this shard from other nodes; held by the running host (given back when it
    /// ends, like the slot's input).
    pub(super) inbound: Mutex<Option<mpsc::Receiver<(NodeId, NodeFrame)>>>,
}

impl SlotReplication {
    /// The slot's replication and the sender the node link's reader feeds it through.
    pub fn new(
        config: ReplicaConfig,
        sender: Arc<dyn NodeSender>,
    ) -> (SlotReplication, mpsc::Sender<(NodeId, NodeFrame)>) {
        let (tx, rx) = mpsc::channel(NODE_INBOUND_FRAMES_MAX);
        let r = SlotReplication {
            config,
            sender,
            inbound: Mutex::new(Some(rx)),
        };
        (r, tx)
    }
}

/// A finished log read.
pub(super) type LogReadDone = (LogReadEffect, Result<Vec<Entry>, LogReadError>);

/// The host's log reads: started on the blocking pool, results back through a channel.
pub(super) struct LogReads {
    tx: mpsc::Sender<LogReadDone>,
    pub(super) rx: mpsc::Receiver<LogReadDone>,
    running: usize,
    waiting: std::collections::VecDeque<LogReadEffect>,
}

impl LogReads {
    pub(super) fn new() -> LogReads {
        let (tx, rx) = mpsc::channel(LOG_READS_RUNNING_MAX);
        LogReads {
            tx,
            rx,
            running: 0,
            waiting: std::collections::VecDeque::new(),
        }
    }

    /// Starts `job` (or queues it behind the running ones) on the shard directory `dir`.
    pub(super) fn start(&mut self, dir: &std::path::Path, job: LogReadEffect) {
        self.waiting.push_back(job);
        self.next(dir);
    }

    /// One read finished: the next waiting one starts.
    pub(super) fn finished(&mut self, dir: &std::path::Path) {
        self.running = self.running.saturating_sub(1);
        self.next(dir);
    }

    fn next(&mut self, dir: &std::path::Path) {
        while self.running < LOG_READS_RUNNING_MAX {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            self.running += 1;
            let (tx, dir): (_, PathBuf) = (self.tx.clone(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || {
                let mut store = crate::storage::FileStore::new(&dir);
                let result = job.perform(&mut store);
                let _ = tx.blocking_send((job, result));
            });
        }
    }
}
