//! Scripted simulations for your own deterministic tests: peers of one mesh that connect,
//! send, append, go offline and come back, under faults you schedule, over the same simulated
//! node, network and disks as the swarm, with the same checkers watching every step. A test
//! then asserts on what each peer received.
//!
//! ```
//! use fabric_sim::script::MeshSim;
//!
//! let mut sim = MeshSim::builder(42).peer("alice", &["ops"]).peer("bob", &["ops"]).build().unwrap();
//! let (alice, bob) = (sim.id("alice"), sim.id("bob"));
//! sim.run_for(100).unwrap();               // both connect
//! sim.go_offline(bob);
//! sim.send(alice, "bob", r#"{"text":"while you were away"}"#).unwrap();
//! sim.crash_node();                         // power loss after the ack...
//! sim.run_for(500).unwrap();
//! sim.restart_node();
//! sim.come_back(bob);
//! sim.settle().unwrap();                    // heal, drain, run every checker
//! let got = sim.received(bob);
//! assert_eq!(got.len(), 1);
//! assert_eq!(got[0].body["text"], "while you were away");
//! ```
//!
//! Message bodies travel inside a small envelope (`{"op":N,"user":BODY,"again":N}`) that makes
//! each one unique, which the checkers need to tell operations apart; [`MeshSim::received`]
//! unwraps it.

use crate::net::Endpoint;
use crate::schedule::{FaultEvent, Schedule};
use crate::world::{Action, Simulation};
use crate::{SimOptions, Violation};
use fabric_proto::{Body, ProtoError, Target};
use std::sync::Arc;

/// A peer of the scripted mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerId(usize);

/// An inbox message as a peer's client received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub pos: u64,
    pub from: String,
    pub to: String,
    /// The body the sender gave.
    pub body: serde_json::Value,
}

/// Builds a [`MeshSim`].
#[derive(Debug, Clone)]
pub struct MeshSimBuilder {
    seed: u64,
    options: SimOptions,
    peers: Vec<(Arc<str>, Vec<Arc<str>>)>,
}

impl MeshSimBuilder {
    /// Adds a peer in `groups`.
    pub fn peer(mut self, name: &str, groups: &[&str]) -> MeshSimBuilder {
        self.peers
            .push((name.into(), groups.iter().map(|g| Arc::from(*g)).collect()));
        self
    }

    /// Node, network and disk settings (`SimOptions::default()` otherwise). Fault rates and
    /// `clients` are ignored: a script has its own peers and schedules its own faults.
    pub fn options(mut self, options: SimOptions) -> MeshSimBuilder {
        self.options = options;
        self
    }

    /// Sets the mesh up and connects every peer.
    pub fn build(self) -> Result<MeshSim, Box<Violation>> {
        let options = SimOptions {
            clients: self.peers.len().max(1),
            crash_interval_ms_mean: 0,
            partition_interval_ms_mean: 0,
            clog_interval_ms_mean: 0,
            disk_full_interval_ms_mean: 0,
            load_phase_ms_mean: 0,
            disconnect_interval_ms_mean: 0,
            duration_ms: u64::MAX,
            ..self.options
        };
        let schedule = Schedule {
            seed: self.seed,
            options,
            events: Vec::new(),
        };
        // A script cannot be run again, so it keeps its last trace lines all along.
        let mut sim = Simulation::build(schedule, self.peers.clone(), true).keeping_last_events();
        sim.guard(|s| s.start())?;
        Ok(MeshSim {
            sim,
            peers: self.peers.into_iter().map(|(p, _)| p).collect(),
            failed: None,
        })
    }
}

/// A scripted mesh on a simulated node. Every call is deterministic for a given seed.
pub struct MeshSim {
    sim: Simulation,
    peers: Vec<Arc<str>>,
    /// A violation found while applying a fault, reported by the next `run_for` or `settle`.
    failed: Option<Box<Violation>>,
}

impl MeshSim {
    pub fn builder(seed: u64) -> MeshSimBuilder {
        MeshSimBuilder {
            seed,
            options: SimOptions::default(),
            peers: Vec::new(),
        }
    }

    /// The peer called `name`. Panics if there is none (a typo in a test).
    pub fn id(&self, name: &str) -> PeerId {
        PeerId(
            self.peers
                .iter()
                .position(|p| &**p == name)
                .unwrap_or_else(|| panic!("no peer {name:?}")),
        )
    }

    /// Simulated time, in ms since the start.
    pub fn now_ms(&self) -> u64 {
        self.sim.now
    }

    /// Queues an inbox message from `from` to `to` (a peer name, `group:NAME` or `*`) with a
    /// JSON `body`; it goes out when the peer is connected and has room in its window.
    pub fn send(&mut self, from: PeerId, to: &str, body: &str) -> Result<(), ProtoError> {
        let to = Target::parse(to)?;
        check_json(body)?;
        self.push(
            from,
            Action::Send {
                to,
                body: body.into(),
            },
        );
        Ok(())
    }

    /// Queues an append to conversation `conv`, with an idempotency key if given.
    pub fn append(
        &mut self,
        from: PeerId,
        conv: &str,
        body: &str,
        key: Option<&str>,
    ) -> Result<(), ProtoError> {
        check_json(body)?;
        self.push(
            from,
            Action::Append {
                conv: conv.into(),
                body: body.into(),
                key: key.map(Arc::from),
            },
        );
        Ok(())
    }

    fn push(&mut self, p: PeerId, action: Action) {
        self.sim.clients[p.0].script.push_back(action);
        self.sim.wake(p.0, 0);
    }

    /// The peer's client closes its connection and stays away.
    pub fn go_offline(&mut self, p: PeerId) {
        self.sim.clients[p.0].online = false;
        self.sim.drop_conn(p.0);
    }

    /// The peer's client reconnects (and is redelivered what it has not acknowledged).
    pub fn come_back(&mut self, p: PeerId) {
        self.sim.clients[p.0].online = true;
        self.sim.wake(p.0, 0);
    }

    /// The node `p`'s client is attached to: peer `i` (in the order they were added) to node
    /// `i % nodes`, so node 0 with one node.
    pub fn node_of(&self, p: PeerId) -> u32 {
        self.sim.node_of(p.0)
    }

    /// Power loss on node 0 (the only node unless the options say otherwise), now.
    pub fn crash_node(&mut self) {
        self.crash(0);
    }

    /// Node 0 boots and recovers.
    pub fn restart_node(&mut self) {
        self.restart(0);
    }

    /// Power loss on `node`, now.
    pub fn crash(&mut self, node: u32) {
        self.fault(FaultEvent::Crash { node });
    }

    /// `node` boots and recovers (nothing if it is up).
    pub fn restart(&mut self, node: u32) {
        self.fault(FaultEvent::Restart { node });
    }

    /// Cuts `peers` off from their nodes (only their packets to them, if `one_way`).
    pub fn partition(&mut self, peers: &[PeerId], one_way: bool) {
        let a = peers.iter().map(|p| Endpoint::Client(p.0 as u32)).collect();
        let mut b: Vec<Endpoint> = peers
            .iter()
            .map(|p| Endpoint::Node(self.node_of(*p)))
            .collect();
        b.sort();
        b.dedup();
        self.fault(FaultEvent::Partition { a, b, one_way });
    }

    /// Ends every partition and clog.
    pub fn heal(&mut self) {
        self.fault(FaultEvent::Heal);
    }

    /// Any schedule event, now. It is recorded in the run's schedule.
    pub fn fault(&mut self, event: FaultEvent) {
        self.sim.record(event.clone());
        if let Err(v) = self.sim.guard(|sim| sim.apply(event)) {
            self.failed.get_or_insert(v);
        }
    }

    /// Runs `ms` of simulated time.
    pub fn run_for(&mut self, ms: u64) -> Result<(), Box<Violation>> {
        if let Some(v) = self.failed.take() {
            return Err(v);
        }
        self.sim.guard(|s| {
            let until = s.now + ms;
            s.run_until(until)
        })
    }

    /// Ends the fault phase for good: everything heals, every peer comes back, and the run
    /// continues until nothing is left to do, then checks that every acknowledged message
    /// reached every recipient. A promise broken anywhere before is reported here too.
    pub fn settle(&mut self) -> Result<(), Box<Violation>> {
        if let Some(v) = self.failed.take() {
            return Err(v);
        }
        self.sim.guard(|s| {
            s.end_faults()?;
            s.run_until(u64::MAX)?;
            s.require_finished()
        })
    }

    /// What `p`'s client has received, once per position, in position order.
    pub fn received(&self, p: PeerId) -> Vec<Received> {
        self.sim.clients[p.0]
            .received
            .iter()
            .map(|(pos, (from, to, body))| Received {
                pos: *pos,
                from: from.to_string(),
                to: to.to_wire(),
                body: unwrap_envelope(body),
            })
            .collect()
    }

    /// Acknowledged requests so far.
    pub fn acks(&self) -> u64 {
        self.sim.acks()
    }
}

fn check_json(body: &str) -> Result<(), ProtoError> {
    Body::from_json_text(body.to_string()).map(|_| ())
}

fn unwrap_envelope(body: &Body) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(body.as_str()).expect("the simulator wrote this body");
    v.get_mut("user")
        .map(serde_json::Value::take)
        .unwrap_or(serde_json::Value::Null)
}
