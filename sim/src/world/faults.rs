//! Faults as the world applies them: a schedule's events (power loss, a killed process, a
//! reboot, partitions and clogs, corrupt reads and full disks, load changes, dropped
//! connections), each on the node, shard, link or client it names.

use super::*;

impl Simulation {
    /// One schedule event.
    pub(crate) fn apply(&mut self, event: FaultEvent) -> Checked {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        trace!(self, "FAULT {event:?}");
        match event {
            FaultEvent::Kill { node } => self.kill(node as usize, false)?,
            FaultEvent::Crash { node } => self.kill(node as usize, true)?,
            FaultEvent::Restart { node } => {
                if !self.nodes[node as usize].up {
                    self.restart_node(node as usize)?;
                }
            }
            FaultEvent::Partition { a, b, one_way } => {
                self.counters.faults += 1;
                self.net.partition(&a, &b, one_way);
            }
            FaultEvent::Heal => self.net.heal(),
            FaultEvent::Clog { from, to, ms } => {
                self.counters.faults += 1;
                self.net.clog(from, to, self.now + ms);
            }
            FaultEvent::CorruptRead {
                node,
                shard,
                segment,
                offset_min,
                offset_max,
            } => {
                self.nodes[node as usize].hosts[shard as usize].flip = Some(ArmedFlip {
                    segment,
                    offset_min,
                    offset_max,
                });
            }
            FaultEvent::DiskFull { node, shard } => {
                self.counters.faults += 1;
                self.nodes[node as usize].hosts[shard as usize].disk_full = true;
            }
            FaultEvent::DiskFree { node, shard } => {
                self.nodes[node as usize].hosts[shard as usize].disk_full = false;
            }
            FaultEvent::Load {
                think_time_max_ms,
                paused,
            } => {
                self.think_time_max_ms = think_time_max_ms;
                self.load_paused = paused;
                for c in 0..self.clients.len() {
                    self.wake(c, 0);
                }
            }
            FaultEvent::Disconnect { client } => self.drop_conn(client as usize),
        }
        Ok(())
    }

    /// Node `n` goes down (power loss if `power_loss`, else its process only), if it is up;
    /// its HTTP requests in progress fail with it.
    fn kill(&mut self, n: usize, power_loss: bool) -> Checked {
        if self.nodes[n].up {
            self.crash_process(n, power_loss)?;
            self.nodes[n].http.clear();
        }
        Ok(())
    }

    /// Adds an event applied now to the run's schedule (scripted runs).
    pub(crate) fn record(&mut self, event: FaultEvent) {
        self.schedule.events.push(Timed {
            at_ms: self.now,
            event,
        });
    }

    /// Node `n`'s process dies; with `power_loss`, the machine too (the disks lose what was
    /// not synced). Without it the page cache survives, unsynced bytes included. Every shard,
    /// its in-flight write, its input and every connection die together, silently: clients
    /// find out by their idle timeouts, or by a reset once the node is back.
    pub(super) fn crash_process(&mut self, n: usize, power_loss: bool) -> Checked {
        self.counters.crashes += 1;
        self.nodes[n].up = false;
        let faults = CrashFaults {
            torn_write_probability: self.options.torn_write_probability,
            tail_corruption_probability: self.options.tail_corruption_probability,
        };
        for s in 0..self.nodes[n].hosts.len() {
            // A write in flight stops after a random number of the node's file steps.
            if let Some(inflight) = self.nodes[n].hosts[s].inflight.take() {
                let mut dry = self.nodes[n].hosts[s].disk.clone();
                let _ = inflight.write.perform(&mut dry);
                let steps = self.rng.random_range(0..=dry.steps());
                let disk = &mut self.nodes[n].hosts[s].disk;
                disk.set_fault(Some(Fault::CrashAfter { steps }));
                let _ = inflight.write.perform(disk);
                trace!(
                    self,
                    "CRASH s{s} after {steps} file steps of the write in flight"
                );
            }
            self.nodes[n].hosts[s].disk.set_fault(None);
            if power_loss {
                let report = self.nodes[n].hosts[s].disk.crash(&mut self.rng, faults);
                self.counters.faults += report.faults();
                trace!(self, "CRASH s{s} {report:?}");
            } else {
                trace!(self, "KILL s{s}: the page cache survives");
            }
            // A new process: a new host, whose first effect is the shard's recovery.
            let driver = new_driver(&self.options, s as ShardIdx);
            let h = &mut self.nodes[n].hosts[s];
            h.driver = driver;
            h.epoch += 1;
            h.inflight = None;
            h.input.clear();
            h.timer_at = None;
        }
        // `known_conns` survives: the clients' ends of those connections survive the crash.
        self.nodes[n].conns.clear();
        self.nodes[n].sessions.clear();
        self.nodes[n].dirty.clear();
        Ok(())
    }

    /// Node `n` boots: every shard's host recovers it from its disk (and the audit checks it).
    pub(super) fn restart_node(&mut self, n: usize) -> Checked {
        trace!(self, "n{n} boots");
        self.nodes[n].up = true;
        let mut outputs = Vec::new();
        for s in 0..self.nodes[n].hosts.len() {
            self.host_effects(n, s as ShardIdx, &mut outputs)?;
        }
        debug_assert!(outputs.is_empty(), "nothing to answer at boot");
        Ok(())
    }
}
