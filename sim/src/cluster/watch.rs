//! Watchers: on each up node, a client session run by the node's own edge core
//! (`fabric_edge::Session`, JSON frames, the node's router) that says hello as peer `a`,
//! subscribes to the conversation from seq 1 and takes every delivery of `a`'s inbox (the
//! workload sends to `a`). Leader changes reach it as the node's glue hands them over
//! (`LeaderChanged`: the session attaches again at the new leader); any other close ends it,
//! and the next step opens a new one.
//!
//! Checkers ([`ClusterViolationKind::WatchBroken`]): within one session, `deliver` frames come
//! in strictly increasing `pos` and events in strictly increasing `seq` (each once), without a
//! gap in seqs while nothing is retired; what they carry at an acknowledged `pos` or `seq` is
//! what was acknowledged (nothing uncommitted is pushed). After the heal every node's
//! watcher, on whatever session it has then, must have received every acknowledged send and
//! (while nothing is retired) every acknowledged append.

use super::{Checked, ClusterViolationKind, World};
use fabric_edge::{InFrame, Session, SessionConfig};
use fabric_proto::internal::{Reply, SessionId};
use fabric_router::host::{session_id, CloseReason};
use fabric_router::Router;

/// Watcher sessions count from here on each node (client sessions count from 1).
const WATCH_SESSION_BASE: u64 = 1 << 40;
/// The peer's token (its hash is what setup registers).
pub(super) const WATCH_TOKEN: &str = "watch";
/// After the heal, every watcher must have everything acknowledged within this.
pub const WATCH_COMPLETE_AFTER_HEAL_MS: u64 = 10_000;

pub(super) struct Watcher {
    session: Session,
    router: Router,
    /// The highest pos and seq this session handed out (0: none).
    last_pos: u64,
    last_seq: u64,
    /// The sends this session delivered.
    delivered: std::collections::BTreeSet<u64>,
    subscribed: bool,
    /// A subscribe was answered `ok`: the subscription lives as long as the session (a leader
    /// change attaches it again), so it is never sent again.
    confirmed: bool,
    /// The `from` of each subscribe sent. One answered `unavailable` may still take effect
    /// (docs/PROTOCOL.md, unknown outcomes): events then start again there.
    froms: std::collections::BTreeSet<u64>,
    /// The `from` of each subscribe not answered yet, oldest first (a shard answers a
    /// session's requests to it in order): an `ok` restarts the events there.
    unanswered: std::collections::VecDeque<u64>,
    /// Set by a subscribe's `ok`: the next event may start again at its `from` (past
    /// retention, at any later seq), or go on from the last one (the session may have taken
    /// the subscription up at a new leader from its marks meanwhile, which replays nothing
    /// the client has).
    restart: Option<u64>,
}

impl Watcher {
    fn new(id: SessionId, unix_ms: u64) -> Watcher {
        let config = SessionConfig {
            // No transport here: nothing to ping.
            ping_interval_ms: 0,
            write_timeout_ms: 0,
            ..SessionConfig::default()
        };
        let mut session = Session::new(id, unix_ms, config);
        let hello = format!(r#"{{"op":"hello","mesh":"m","peer":"a","token":"{WATCH_TOKEN}"}}"#);
        session.handle_frame(
            unix_ms,
            InFrame {
                binary: false,
                bytes: hello.as_bytes(),
            },
        );
        Watcher {
            session,
            router: Router::new(1, 1).expect("one shard"),
            last_pos: 0,
            last_seq: 0,
            delivered: Default::default(),
            subscribed: false,
            confirmed: false,
            froms: Default::default(),
            unanswered: Default::default(),
            restart: None,
        }
    }

    pub(super) fn id(&self) -> SessionId {
        self.session.id()
    }
}

impl World {
    /// Whether this session is node `i`'s watcher's.
    pub(super) fn is_watcher(&self, i: usize, session: SessionId) -> bool {
        self.watchers[i].as_ref().is_some_and(|w| w.id() == session)
    }

    /// Replies for node `i`'s watcher: into its session core.
    pub(super) fn watch_replies(&mut self, i: usize, replies: Vec<Reply>) {
        let unix_ms = self.time(i).unix_ms;
        if let Some(w) = self.watchers[i].as_mut() {
            for reply in replies {
                w.session.handle_reply(unix_ms, 0, reply);
            }
        }
    }

    /// The host closed node `i`'s watcher session, or told it its leader changed.
    pub(super) fn watch_closed(&mut self, i: usize, why: CloseReason) {
        let unix_ms = self.time(i).unix_ms;
        if let Some(w) = self.watchers[i].as_mut() {
            match why {
                CloseReason::LeaderChanged => {
                    self.summary.watch_leader_changes += 1;
                    let router = &w.router;
                    w.session
                        .handle_shard_detached(unix_ms, 0, &|p| router.shard_of(p));
                }
                CloseReason::Restarted => w.session.handle_shard_restarted(unix_ms, 0),
                CloseReason::Overloaded => w.session.handle_shard_overloaded(unix_ms, 0),
            }
        }
    }

    /// Node `i` lost power: its watcher's session is gone with it.
    pub(super) fn watch_crashed(&mut self, i: usize) {
        if i < self.watchers.len() {
            self.watchers[i] = None;
        }
    }

    /// Every up node's watcher: opened if it has none, its timers fired, its requests handed
    /// to the node's driver, its frames checked.
    pub(super) fn pump_watchers(&mut self) -> Checked {
        if !self.opts.watch {
            return Ok(());
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            let t = self.time(i);
            if self.watchers[i].is_none() {
                // A node outside the group serves no client (it knows no leader).
                if !self.target.contains(&self.nodes[i].id) {
                    continue;
                }
                self.watch_sessions += 1;
                let id = session_id(i as u64 + 1, WATCH_SESSION_BASE + self.watch_sessions);
                self.watchers[i] = Some(Watcher::new(id, t.unix_ms));
            }
            let w = self.watchers[i].as_mut().expect("a watcher");
            if w.session.poll_timeout().is_some_and(|at| at <= t.unix_ms) {
                w.session.handle_timeout(t.unix_ms);
            }
            self.watch_subscribe(i);
            self.watch_requests(i);
            self.watch_frames(i)?;
            let w = self.watchers[i].as_mut().expect("a watcher");
            if w.session.is_closed() {
                // `Closed` went to the shards with its other requests.
                self.watch_requests(i);
                self.watchers[i] = None;
            }
        }
        Ok(())
    }

    fn watch_subscribe(&mut self, i: usize) {
        let t = self.time(i);
        let w = self.watchers[i].as_mut().expect("a watcher");
        if w.subscribed || w.session.identity().is_none() {
            return;
        }
        w.subscribed = true;
        w.froms.insert(w.last_seq + 1);
        w.unanswered.push_back(w.last_seq + 1);
        let op = format!(
            r#"{{"op":"subscribe","ref":1,"conv":"c","from":{}}}"#,
            w.last_seq + 1
        );
        w.session.handle_frame(
            t.unix_ms,
            InFrame {
                binary: false,
                bytes: op.as_bytes(),
            },
        );
    }

    /// The session's requests, through the node's router, to the node's driver.
    fn watch_requests(&mut self, i: usize) {
        let t = self.time(i);
        let w = self.watchers[i].as_mut().expect("a watcher");
        while let Some((route, req)) = w.session.poll_request() {
            w.router.handle_request(t.unix_ms, route, req);
        }
        let id = w.id();
        let mut batches = Vec::new();
        while let Some((_, batch)) = w.router.poll_batch() {
            batches.push(batch);
        }
        for batch in batches {
            self.nodes[i].driver.handle_batch(t, id, batch);
        }
    }

    /// The frames the session hands its client, checked, then written (credit back).
    fn watch_frames(&mut self, i: usize) -> Checked {
        let t = self.time(i);
        let mut frames = Vec::new();
        let w = self.watchers[i].as_mut().expect("a watcher");
        while let Some(f) = w.session.poll_transmit() {
            frames.push(f);
        }
        w.session.handle_flushed(t.unix_ms);
        for f in frames {
            let v: serde_json::Value = serde_json::from_slice(&f.bytes).map_err(|e| {
                let msg = format!("node {} watcher got a frame that is not JSON: {e}", i + 1);
                (ClusterViolationKind::WatchBroken, msg)
            })?;
            match v["op"].as_str() {
                Some("deliver") => self.watch_deliver(i, &v)?,
                Some("event") => self.watch_event(i, &v)?,
                // The subscribe was not answered `ok` (`unavailable`: no leader, or no answer
                // in time): as a client does, subscribe again from the next seq.
                Some("error") if v["ref"].as_u64() == Some(1) => {
                    let w = self.watchers[i].as_mut().expect("a watcher");
                    w.unanswered.pop_front();
                    w.subscribed = w.confirmed;
                }
                // The subscription starts again at its `from` (or, past retention, at the
                // first entry kept): the events that follow count from there.
                Some("ok") if v["ref"].as_u64() == Some(1) => {
                    let w = self.watchers[i].as_mut().expect("a watcher");
                    w.confirmed = true;
                    w.restart = w.unanswered.pop_front();
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn watch_deliver(&mut self, i: usize, v: &serde_json::Value) -> Checked {
        let pos = v["pos"].as_u64().unwrap_or(0);
        let body = v["body"].to_string();
        let w = self.watchers[i].as_mut().expect("a watcher");
        let last = w.last_pos;
        w.last_pos = pos;
        w.delivered.insert(pos);
        let id = w.id();
        if pos <= last {
            return Err(broken(format!(
                "node {} session {id:#x}: deliver pos {pos} after pos {last}",
                i + 1
            )));
        }
        let acked = self.acked_sends_by_pos.get(&pos);
        same_body(acked, &body, || {
            format!("node {} session {id:#x}: pos {pos}", i + 1)
        })
    }

    fn watch_event(&mut self, i: usize, v: &serde_json::Value) -> Checked {
        let seq = v["seq"].as_u64().unwrap_or(0);
        let body = v["body"].to_string();
        let dense = !self.retires();
        let w = self.watchers[i].as_mut().expect("a watcher");
        let last = w.last_seq;
        w.last_seq = seq;
        let id = w.id();
        let restarted = match w.restart.take() {
            Some(from) => seq == from || (!dense && seq >= from),
            None => false,
        };
        let follows = seq > last && (!dense || seq == last + 1);
        if !(follows || restarted || w.froms.contains(&seq)) {
            return Err(broken(format!(
                "node {} session {id:#x}: event seq {seq} after seq {last} (nothing retired: \
                 {dense})",
                i + 1
            )));
        }
        let acked = self.acked_by_seq.get(&seq);
        same_body(acked, &body, || {
            format!("node {} session {id:#x}: seq {seq}", i + 1)
        })
    }

    /// Whether the run's retention may retire entries a subscription replays (then a replay
    /// may jump over them, as docs/PROTOCOL.md allows).
    fn retires(&self) -> bool {
        self.opts.retention_bytes_max < super::RETENTION_NEVER_BYTES
    }

    /// Whether every up node's watcher holds everything acknowledged.
    fn watchers_complete(&self) -> bool {
        let top_seq = self.acked_by_seq.keys().next_back().copied().unwrap_or(0);
        (0..self.nodes.len()).all(|i| {
            if !self.nodes[i].up || !self.target.contains(&self.nodes[i].id) {
                return true;
            }
            let Some(w) = &self.watchers[i] else {
                return false;
            };
            let sends = self
                .acked_sends_by_pos
                .keys()
                .all(|p| w.delivered.contains(p));
            let events = self.retires() || w.last_seq >= top_seq;
            w.subscribed && sends && events
        })
    }

    /// After the heal: every watcher catches up with what was acknowledged.
    pub(super) fn watch_liveness(&mut self) -> Checked {
        if !self.opts.watch {
            return Ok(());
        }
        if self.run_until(WATCH_COMPLETE_AFTER_HEAL_MS, |w| w.watchers_complete())? {
            return Ok(());
        }
        let state: Vec<String> = self
            .watchers
            .iter()
            .enumerate()
            .map(|(i, w)| match w {
                Some(w) => format!(
                    "node {}: session {:#x} pos {} seq {} ({} sends)",
                    i + 1,
                    w.id(),
                    w.last_pos,
                    w.last_seq,
                    w.delivered.len()
                ),
                None => format!("node {}: no session", i + 1),
            })
            .collect();
        Err(broken(format!(
            "{WATCH_COMPLETE_AFTER_HEAL_MS} ms after the heal a watcher lacks acknowledged \
             entries ({} sends, top seq {:?}): {}",
            self.acked_sends_by_pos.len(),
            self.acked_by_seq.keys().next_back(),
            state.join("; ")
        )))
    }
}

/// A pushed body must be the acknowledged one (nothing uncommitted is pushed); `what` names
/// the push.
fn same_body(acked: Option<&String>, body: &str, what: impl Fn() -> String) -> Checked {
    match acked {
        Some(acked) if acked != body => Err(broken(format!(
            "{}: pushed as {body}, acknowledged as {acked}",
            what()
        ))),
        _ => Ok(()),
    }
}

fn broken(message: String) -> (ClusterViolationKind, String) {
    (ClusterViolationKind::WatchBroken, message)
}
