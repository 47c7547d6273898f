//! The storage side of a node's glue: WAL writes and their completion (and the faults they
//! run into), retention probes, and recovery from the simulated disks (its audit is in
//! `audit`, power loss and reboots in `faults`).

use super::*;

impl Simulation {
    pub(super) fn start_write(&mut self, n: usize, shard: ShardIdx, job: WriteJob) {
        let w = &job.write;
        let id = self.next_write;
        self.next_write += 1;
        self.counters.wal_writes += 1;
        let latency = self
            .rng
            .random_range(self.options.fsync_latency_min_ms..=self.options.fsync_latency_max_ms);
        trace!(
            self,
            "s{shard} wal write {id} seg={}{} lsn={}..={} bytes={} delete={:?} done in {latency}ms",
            w.segment,
            if w.create { " (new)" } else { "" },
            w.first_lsn,
            w.last_lsn,
            w.bytes.len(),
            w.delete
        );
        // The acks taken in so far are all in this write only if nothing taken in is left
        // unwritten (a frame cut at wal_batch_bytes_max may go first, the cursor records
        // after it): only then does this write's completion make them durable.
        let all_polled = self.nodes[n].hosts[shard as usize]
            .driver
            .shard()
            .is_some_and(|x| x.all_polled());
        let acks = if shard == self.mesh_shard && all_polled {
            self.nodes[n].model.ack_snapshot()
        } else {
            Vec::new()
        };
        // The node's file steps run when the write completes (or, cut short, when the power
        // fails while it is in flight: `crash`).
        let host = &mut self.nodes[n].hosts[shard as usize];
        host.inflight = Some(Inflight {
            id,
            write: job,
            acks,
        });
        self.schedule_at(
            self.now + latency,
            Event::WalDone {
                node: n,
                shard,
                write: id,
            },
        );
    }

    /// A disk read of the log, completed after a drawn latency (reads overtake each other
    /// and writes, as `pread`s on the node's reader thread may).
    pub(super) fn start_read(&mut self, n: usize, shard: ShardIdx, job: ReadJob) {
        self.counters.log_reads += 1;
        let latency = self
            .rng
            .random_range(self.options.fsync_latency_min_ms..=self.options.fsync_latency_max_ms);
        let epoch = self.nodes[n].hosts[shard as usize].epoch;
        let r = job.request;
        trace!(
            self,
            "s{shard} read {} seg={} offset={} len={} done in {latency}ms",
            r.id,
            r.segment,
            r.offset,
            r.len
        );
        self.schedule_at(
            self.now + latency,
            Event::ReadDone {
                node: n,
                shard,
                epoch,
                job,
            },
        );
    }

    /// The read runs on the disk as it is now (retention may have deleted its segment, a
    /// crash may have cut it back); while faults are on it may fail or return a flipped bit.
    pub(super) fn read_done(
        &mut self,
        n: usize,
        shard: ShardIdx,
        epoch: u64,
        job: ReadJob,
    ) -> Checked {
        let s = shard as usize;
        if !self.nodes[n].up || self.nodes[n].hosts[s].epoch != epoch {
            return Ok(());
        }
        let faulty = self.phase == Phase::Faults
            && self
                .rng
                .random_bool(self.options.log_read_fault_probability);
        let mut done = job.perform(&mut self.nodes[n].hosts[s].disk);
        if faulty {
            self.counters.faults += 1;
            match &mut done.result {
                Ok(bytes) if !bytes.is_empty() && self.rng.random_bool(0.5) => {
                    let i = self.rng.random_range(0..bytes.len());
                    bytes[i] ^= 1 << self.rng.random_range(0..8);
                    trace!(
                        self,
                        "s{shard} read {} returns a flipped bit at +{i}",
                        done.id
                    );
                }
                _ => {
                    trace!(self, "s{shard} read {} fails (EIO)", done.id);
                    done = job.failed("injected EIO");
                }
            }
        }
        let t = self.time();
        self.nodes[n].hosts[s].driver.handle_read_done(t, done);
        // A read that brought inbox bodies back may have let a retention round start.
        self.probe_retention(n, shard);
        Ok(())
    }

    /// The fault a completing write runs into, if any: a full disk, or (while faults are on)
    /// ENOSPC or EIO at one of its file steps, chosen from a dry run of those steps.
    fn write_fault(&mut self, n: usize, s: usize, w: &WriteJob) -> Option<Fault> {
        if self.nodes[n].hosts[s].disk_full {
            return Some(Fault::Full);
        }
        if self.phase != Phase::Faults || !self.rng.random_bool(self.options.enospc_probability) {
            return None;
        }
        let mut dry = self.nodes[n].hosts[s].disk.clone();
        dry.set_fault(None);
        let _ = w.perform(&mut dry);
        let failable: Vec<(usize, &str)> = dry
            .step_ops()
            .iter()
            .enumerate()
            .filter(|(_, op)| ["create", "write", "append", "fdatasync"].contains(op))
            .map(|(i, op)| (i, *op))
            .collect();
        if failable.is_empty() {
            return None;
        }
        let (step, op) = failable[self.rng.random_range(0..failable.len())];
        let sectors = if op == "fdatasync" {
            usize::MAX
        } else {
            self.rng.random_range(0..4)
        };
        let drop_pages = self.rng.random_bool(0.5);
        Some(Fault::FailAt {
            step,
            sectors,
            drop_pages,
        })
    }

    pub(super) fn wal_done(&mut self, n: usize, shard: ShardIdx, id: u64) -> Checked {
        let s = shard as usize;
        if !self.nodes[n].up {
            return Ok(());
        }
        let Some(inflight) = self.nodes[n].hosts[s].inflight.take_if(|i| i.id == id) else {
            return Ok(()); // the write died with a crashed incarnation
        };
        let job = &inflight.write;
        let w = &job.write;
        let fault = self.write_fault(n, s, job);
        self.nodes[n].hosts[s].disk.set_fault(fault);
        let result = job.perform(&mut self.nodes[n].hosts[s].disk);
        self.nodes[n].hosts[s].disk.set_fault(None);
        let t = self.time();
        match &result {
            Err(f) => {
                self.counters.faults += 1;
                trace!(
                    self,
                    "s{shard} wal write {id} failed ({fault:?}): {} (cut back: {})",
                    f.error,
                    f.cleaned
                );
            }
            Ok(()) => {
                self.learn_synced(n, shard, Some(w.segment))?;
                self.nodes[n].model.ack_durable(&inflight.acks);
                trace!(
                    self,
                    "s{shard} wal write {id} durable up to lsn {}",
                    w.last_lsn
                );
            }
        }
        let ok = result.is_ok();
        let driver = &mut self.nodes[n].hosts[s].driver;
        driver.handle_write_done(t, result);
        if ok {
            // As the node's glue does: the next batch is framed into this write's buffer, so
            // a recycled buffer that kept old bytes would show up as corrupt WAL in the
            // checkers.
            driver.recycle_wal_buffer(inflight.write.into_buffer());
            self.probe_retention(n, shard);
        }
        Ok(())
    }

    /// Retention starts (and evicts conversation entries, and their idempotency keys) in
    /// `handle_wal_done`, or when a read brought back the inbox bodies a round waited for; the
    /// shard's oldest retained seq right after either tells the checker which
    /// keys the shard may have forgotten (read from the core, not through a `read`, whose
    /// answer may come later from disk).
    pub(super) fn probe_retention(&mut self, n: usize, shard: ShardIdx) {
        if self.options.retention_bytes_max >= RETENTION_OFF_BYTES {
            return;
        }
        for conv in self.nodes[n].model.conv_names() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let first = self.nodes[n].hosts[shard as usize]
                .driver
                .shard()
                .and_then(|x| x.retained_from(MESH, &conv));
            if let Some(first) = first {
                self.nodes[n].model.note_evicted(&conv, first - 1);
            }
        }
    }

    /// The host asked for a new incarnation of `shard`: recovered from its disk as the node
    /// does it, handed to the host, then audited.
    pub(super) fn recover_effect(&mut self, n: usize, shard: ShardIdx, job: RecoverJob) -> Checked {
        let s = shard as usize;
        if self.nodes[n].hosts[s].epoch > 0 && self.nodes[n].up {
            self.counters.restarts += 1;
        }
        trace!(self, "s{shard} recovers");
        let host = &mut self.nodes[n].hosts[s];
        host.epoch += 1;
        host.inflight = None;
        host.timer_at = None;
        if shard == self.mesh_shard {
            self.nodes[n].model.restart();
        }
        self.recover(n, shard, job)?;
        self.audit(n, shard)
    }

    /// Recovery exactly as the node does it (`fabric_shard::store::recover` on the shard's
    /// disk), after maybe one corrupted read of synced data that must be refused.
    pub(super) fn recover(&mut self, n: usize, shard: ShardIdx, job: RecoverJob) -> Checked {
        let s = shard as usize;
        if let Some(armed) = self.nodes[n].hosts[s].flip.take() {
            let flip = self.nodes[n].hosts[s].disk.pick_read_flip_in(
                &mut self.rng,
                armed.segment,
                armed.offset_min.map(|o| o as usize),
                armed.offset_max.map(|o| o as usize),
            );
            if let Some(flip) = flip {
                self.counters.faults += 1;
                self.nodes[n].hosts[s].disk.flip_next_read(flip);
                match job.perform(&mut self.nodes[n].hosts[s].disk) {
                    Err(RecoverError::Corrupt { file, offset, .. }) => {
                        trace!(
                            self,
                            "s{shard} read corruption {flip:?} refused: {file} at {offset}"
                        );
                    }
                    Err(e) => {
                        return fail(
                            ViolationKind::RecoveryRefused,
                            format!(
                            "s{shard} read corruption {flip:?} refused with the wrong error: {e}"
                        ),
                        )
                    }
                    Ok((_, report)) => {
                        return fail(
                            ViolationKind::CorruptionAccepted,
                            format!(
                                "s{shard} recovery accepted {flip:?} in synced data: {report:?}"
                            ),
                        )
                    }
                }
            }
        }
        let (recovered, report) = match job.perform(&mut self.nodes[n].hosts[s].disk) {
            Ok(x) => x,
            Err(e) => {
                return fail(
                    ViolationKind::RecoveryRefused,
                    format!("s{shard} recovery refused a sound disk: {e}"),
                )
            }
        };
        trace!(self, "s{shard} recovered {report:?}");
        let t = self.time();
        self.nodes[n].hosts[s]
            .driver
            .handle_recovered(t, Ok((recovered, report)));
        self.learn_synced(n, shard, None)?;
        Ok(())
    }
}
