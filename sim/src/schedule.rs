//! Schedules: the timed faults and load changes a run applies, as data.
//!
//! A random run *generates* its schedule from the seed (from an RNG stream of its own, so the
//! run's other draws are the same whether the schedule was generated or read from a file) and
//! then applies it; a replay reads the same schedule from a file and applies it. Everything
//! else a run draws (latencies, tears, which bytes a flip hits) comes from the seed, which the
//! file carries, so a file alone replays a run exactly. Files are JSON:
//!
//! ```json
//! { "seed": 7,
//!   "options": { "clients": 4, "duration_ms": 20000 },
//!   "events": [
//!     { "at_ms": 1500, "event": "partition", "a": ["c0", "c1"], "b": ["n0"], "one_way": true },
//!     { "at_ms": 4000, "event": "heal" },
//!     { "at_ms": 5000, "event": "crash", "node": 0 },
//!     { "at_ms": 5300, "event": "restart", "node": 0 } ] }
//! ```
//!
//! Options left out take `SimOptions::default()`. The fault phase lasts `options.duration_ms`;
//! then every fault heals (network, disks, a down node restarts) and the liveness phase runs.

use crate::net::Endpoint;
use crate::options::{SimConfigError, SimOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One thing that happens to the cluster at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultEvent {
    /// Power loss: every shard of the node, its sessions and its unsynced writes.
    Crash {
        node: u32,
    },
    /// The node's process dies (SIGKILL, OOM) but the machine does not: sessions and the write
    /// in flight stop (after any of its file steps), the page cache survives, unsynced bytes
    /// included, until a later power loss.
    Kill {
        node: u32,
    },
    /// The node boots and recovers from its disks (nothing if it is up).
    Restart {
        node: u32,
    },
    /// Packets from every endpoint of `a` to every endpoint of `b` are dropped, and back
    /// unless `one_way`.
    Partition {
        a: Vec<Endpoint>,
        b: Vec<Endpoint>,
        #[serde(default)]
        one_way: bool,
    },
    /// Ends every partition and clog.
    Heal,
    /// Packets from `from` to `to` are held for `ms`, then delivered.
    Clog {
        from: Endpoint,
        to: Endpoint,
        ms: u64,
    },
    /// The next recovery of this shard reads one flipped bit in a sealed segment (segment
    /// `segment` if given, within `offset_min..offset_max` if given; in a message body half of
    /// the time otherwise). It must refuse to start, and a retry reads clean.
    CorruptRead {
        node: u32,
        shard: u32,
        #[serde(default)]
        segment: Option<u64>,
        #[serde(default)]
        offset_min: Option<u64>,
        #[serde(default)]
        offset_max: Option<u64>,
    },
    /// Every write of this shard fails with ENOSPC until `disk_free`.
    DiskFull {
        node: u32,
        shard: u32,
    },
    DiskFree {
        node: u32,
        shard: u32,
    },
    /// Clients pause up to `think_time_max_ms` between operations; `paused` stops new ones.
    Load {
        think_time_max_ms: u64,
        #[serde(default)]
        paused: bool,
    },
    /// A client drops its connection (a phone changing networks) and reconnects.
    Disconnect {
        client: u32,
    },
}

/// An event and its simulated time, in ms from the start. In files, one flat object:
/// `{"at_ms": 5000, "event": "crash", "node": 0}`; a misspelt field is an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: FaultEvent,
}

impl<'de> Deserialize<'de> for Timed {
    // By hand: serde's `flatten` cannot refuse unknown fields, and a typo in a hand-written
    // schedule must not silently become a default.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Timed, D::Error> {
        use serde::de::Error;
        let mut v = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let at_ms = v
            .remove("at_ms")
            .ok_or_else(|| D::Error::missing_field("at_ms"))?;
        let at_ms = at_ms
            .as_u64()
            .ok_or_else(|| D::Error::custom("at_ms must be a whole number of ms"))?;
        let event =
            FaultEvent::deserialize(serde_json::Value::Object(v)).map_err(D::Error::custom)?;
        Ok(Timed { at_ms, event })
    }
}

/// A run, as data: seed, options and the events it applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub seed: u64,
    #[serde(default)]
    pub options: SimOptions,
    #[serde(default)]
    pub events: Vec<Timed>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a schedule: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: String, why: SimConfigError },
}

impl Schedule {
    /// The schedule a random run of `seed` with `options` applies.
    pub fn generate(seed: u64, options: &SimOptions) -> Schedule {
        Schedule {
            seed,
            options: options.clone(),
            events: generate_events(seed, options),
        }
    }

    pub fn from_json(text: &str, path: &str) -> Result<Schedule, ScheduleError> {
        let s: Schedule = serde_json::from_str(text).map_err(|source| ScheduleError::Parse {
            path: path.into(),
            source,
        })?;
        s.validate().map_err(|why| ScheduleError::Invalid {
            path: path.into(),
            why,
        })?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Schedule, ScheduleError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Read {
            path: p.clone(),
            source,
        })?;
        Schedule::from_json(&text, &p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a schedule serializes")
    }

    pub fn save(&self, path: &Path) -> Result<(), ScheduleError> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| ScheduleError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Why this schedule cannot run, if it cannot: bad options, events out of order or past
    /// the fault phase, endpoints, nodes or shards that do not exist.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        let o = &self.options;
        o.validate()?;
        let endpoint_ok = |e: &Endpoint| match e {
            Endpoint::Node(n) => *n < o.nodes,
            Endpoint::Client(c) => (*c as usize) < o.clients,
        };
        let mut last = 0;
        for (i, t) in self.events.iter().enumerate() {
            let bad = |why: &'static str| {
                Err(SimConfigError::Event {
                    index: i,
                    event: format!("{:?}", t.event),
                    why,
                })
            };
            if t.at_ms < last {
                return bad("events must be in time order");
            }
            last = t.at_ms;
            if t.at_ms >= o.duration_ms {
                return bad("at_ms must be inside the fault phase (below options.duration_ms)");
            }
            let ok = match &t.event {
                FaultEvent::Crash { node }
                | FaultEvent::Kill { node }
                | FaultEvent::Restart { node } => *node < o.nodes,
                FaultEvent::Partition { a, b, .. } => {
                    a.iter().chain(b).all(endpoint_ok) && !a.is_empty() && !b.is_empty()
                }
                FaultEvent::Heal | FaultEvent::Load { .. } => true,
                FaultEvent::Clog { from, to, .. } => endpoint_ok(from) && endpoint_ok(to),
                FaultEvent::CorruptRead {
                    node,
                    shard,
                    offset_min,
                    offset_max,
                    ..
                } => {
                    *node < o.nodes
                        && *shard < o.shards
                        && offset_min.unwrap_or(0) <= offset_max.unwrap_or(u64::MAX)
                }
                FaultEvent::DiskFull { node, shard } | FaultEvent::DiskFree { node, shard } => {
                    *node < o.nodes && *shard < o.shards
                }
                FaultEvent::Disconnect { client } => (*client as usize) < o.clients,
            };
            if !ok {
                return bad("names a node, shard or client that does not exist (or is empty)");
            }
        }
        Ok(())
    }
}

/// A gap drawn around `mean` (uniform on 1..=2*mean): faults neither periodic nor clustered.
fn gap(rng: &mut ChaCha8Rng, mean: u64) -> u64 {
    rng.random_range(1..=mean.saturating_mul(2).max(1))
}

/// Each kind of fault on its own timeline, merged in time order (stable, so events at the
/// same ms keep their kind's order: a `corrupt_read` precedes the crash it arms for).
// Over 70 lines: its draws come in one fixed order that every recorded seed's schedule depends on;
// split, a reordering would silently change them.
fn generate_events(seed: u64, o: &SimOptions) -> Vec<Timed> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5343_4845_4455_4c45);
    let end = o.duration_ms;
    let mut events = Vec::new();
    // The node each fault hits. With one node nothing is drawn, so a one-node schedule is the
    // one it was before faults named their node.
    let pick_node = |rng: &mut ChaCha8Rng| {
        if o.nodes > 1 {
            rng.random_range(0..o.nodes)
        } else {
            0
        }
    };
    // Node `n`'s clients (`i % nodes == n`): all of them with one node.
    let clients_of = |n: u32| -> Vec<Endpoint> {
        (0..o.clients as u32)
            .filter(|i| i % o.nodes == n)
            .map(Endpoint::Client)
            .collect()
    };
    let push = |events: &mut Vec<Timed>, at_ms: u64, event: FaultEvent| {
        if at_ms < end {
            events.push(Timed { at_ms, event });
        }
    };
    if o.crash_interval_ms_mean > 0 {
        let mut t = gap(&mut rng, o.crash_interval_ms_mean);
        while t < end {
            let node = pick_node(&mut rng);
            if rng.random_bool(o.read_corruption_probability) {
                let shard = rng.random_range(0..o.shards);
                let corrupt = FaultEvent::CorruptRead {
                    node,
                    shard,
                    segment: None,
                    offset_min: None,
                    offset_max: None,
                };
                push(&mut events, t, corrupt);
            }
            // Some crashes are of the process only: what it read back from the page cache
            // must be synced before it is served, or a later power loss takes it.
            let down = if rng.random_bool(0.3) {
                FaultEvent::Kill { node }
            } else {
                FaultEvent::Crash { node }
            };
            push(&mut events, t, down);
            let down = rng.random_range(0..=o.restart_delay_ms_max);
            push(&mut events, t + down, FaultEvent::Restart { node });
            t += down + gap(&mut rng, o.crash_interval_ms_mean);
        }
    }
    if o.partition_interval_ms_mean > 0 {
        let mut t = gap(&mut rng, o.partition_interval_ms_mean);
        while t < end {
            let n = pick_node(&mut rng);
            let (node, clients) = (Endpoint::Node(n), clients_of(n));
            let mut side: Vec<Endpoint> = clients
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.5))
                .collect();
            if side.is_empty() {
                side.push(clients[rng.random_range(0..clients.len())]);
            }
            let (a, b, one_way) = match rng.random_range(0..3) {
                0 => (side, vec![node], false),
                1 => (side, vec![node], true),
                _ => (vec![node], side, true),
            };
            push(&mut events, t, FaultEvent::Partition { a, b, one_way });
            t += rng.random_range(1..=o.partition_ms_max.max(1));
            push(&mut events, t, FaultEvent::Heal);
            t += gap(&mut rng, o.partition_interval_ms_mean);
        }
    }
    if o.clog_interval_ms_mean > 0 {
        let mut t = gap(&mut rng, o.clog_interval_ms_mean);
        while t < end {
            let n = pick_node(&mut rng);
            let (node, clients) = (Endpoint::Node(n), clients_of(n));
            let c = clients[rng.random_range(0..clients.len())];
            let (from, to) = if rng.random_bool(0.5) {
                (c, node)
            } else {
                (node, c)
            };
            let ms = rng.random_range(1..=o.clog_ms_max.max(1));
            push(&mut events, t, FaultEvent::Clog { from, to, ms });
            t += gap(&mut rng, o.clog_interval_ms_mean);
        }
    }
    if o.disk_full_interval_ms_mean > 0 {
        let mut t = gap(&mut rng, o.disk_full_interval_ms_mean);
        while t < end {
            let node = pick_node(&mut rng);
            let shard = rng.random_range(0..o.shards);
            push(&mut events, t, FaultEvent::DiskFull { node, shard });
            t += rng.random_range(1..=o.disk_full_ms_max.max(1));
            push(&mut events, t, FaultEvent::DiskFree { node, shard });
            t += gap(&mut rng, o.disk_full_interval_ms_mean);
        }
    }
    if o.load_phase_ms_mean > 0 {
        let mut t = gap(&mut rng, o.load_phase_ms_mean);
        while t < end {
            let think_time_max_ms = [0, 2, 10, 50, 200][rng.random_range(0..5)];
            let paused = rng.random_bool(0.15);
            push(
                &mut events,
                t,
                FaultEvent::Load {
                    think_time_max_ms,
                    paused,
                },
            );
            t += gap(&mut rng, o.load_phase_ms_mean);
        }
    }
    if o.disconnect_interval_ms_mean > 0 {
        let mut t = gap(&mut rng, o.disconnect_interval_ms_mean);
        while t < end {
            let client = rng.random_range(0..o.clients as u32);
            push(&mut events, t, FaultEvent::Disconnect { client });
            t += gap(&mut rng, o.disconnect_interval_ms_mean);
        }
    }
    events.sort_by_key(|e| e.at_ms);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_schedule_round_trips_through_json() {
        // Proves what a failing run writes is what a replay reads: every event kind and every
        // option survive the file unchanged, and the file validates.
        for seed in 0..50 {
            let s = Schedule::generate(seed, &crate::swarm(seed));
            let back = Schedule::from_json(&s.to_json(), "mem").expect("valid");
            assert_eq!(back, s, "seed {seed}");
        }
    }

    #[test]
    fn a_hand_written_schedule_needs_only_what_it_changes() {
        // Proves the short form users write parses, with defaults for everything left out,
        // and that nonsense is refused with a message naming the event.
        let s = Schedule::from_json(
            r#"{"seed":1,"options":{"clients":2},"events":[
                {"at_ms":10,"event":"partition","a":["c0"],"b":["n0"],"one_way":true},
                {"at_ms":20,"event":"heal"}]}"#,
            "mem",
        )
        .expect("valid");
        assert_eq!(s.options.clients, 2);
        assert_eq!(s.options.shards, SimOptions::default().shards);
        let bad = Schedule::from_json(
            r#"{"seed":1,"events":[{"at_ms":10,"event":"crash","node":3}]}"#,
            "mem",
        )
        .unwrap_err();
        assert!(bad.to_string().contains("event 0"), "{bad}");
        let late = Schedule::from_json(
            r#"{"seed":1,"options":{"duration_ms":100},"events":[{"at_ms":100,"event":"heal"}]}"#,
            "mem",
        )
        .unwrap_err();
        assert!(late.to_string().contains("fault phase"), "{late}");
    }
}
