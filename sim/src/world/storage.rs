//! The storage side of the glue: WAL writes and their completion, power loss, restarts,
//! recovery from the simulated disks, and the audit after each recovery.

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

    /// Retention starts (and evicts conversation entries, and their idempotency keys, from
    /// memory) only in `handle_wal_done`; a one-entry read from seq 1 right after shows what is
    /// left, so the checker knows which keys the shard may have forgotten.
    pub(super) fn probe_retention(&mut self, n: usize, shard: ShardIdx) {
        if self.options.retention_bytes_max >= RETENTION_OFF_BYTES {
            return;
        }
        let node = &mut self.nodes[n];
        let probe = match node.probe {
            Some(p) => p,
            None => {
                let p = node.new_session();
                *node.probe.insert(p)
            }
        };
        for (i, conv) in self.nodes[n].model.conv_names().into_iter().enumerate() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let read = ShardOp::Read {
                r: i as u64,
                mesh: MESH.into(),
                conv,
                from: 1,
                limit: 1,
            };
            if let Some(x) = self.nodes[n].hosts[shard as usize].driver.shard_mut() {
                x.handle_requests(
                    self.now,
                    [Request {
                        session: probe,
                        op: read,
                    }],
                );
            }
        }
        let t = self.time();
        self.nodes[n].hosts[shard as usize].driver.flush(t);
    }

    /// Power loss: every shard, its in-flight write, its input and every connection die
    /// together, silently: clients find out by their idle timeouts, or by a reset once the
    /// node is back.
    pub(super) fn crash(&mut self, n: usize) -> Checked {
        self.crash_process(n, true)
    }

    /// The node's process dies; with `power_loss`, the machine too (the disks lose what was
    /// not synced). Without it the page cache survives, unsynced bytes included.
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

    /// The node boots: every shard's host recovers it from its disk (and the audit checks it).
    pub(super) fn restart_node(&mut self, n: usize) -> Checked {
        trace!(self, "node boots");
        self.nodes[n].up = true;
        let mut outputs = Vec::new();
        for s in 0..self.nodes[n].hosts.len() {
            self.host_effects(n, s as ShardIdx, &mut outputs)?;
        }
        debug_assert!(outputs.is_empty(), "nothing to answer at boot");
        Ok(())
    }

    /// The host asked for a new incarnation of `shard`: recovered from its disk as the node
    /// does it, handed to the host, then audited.
    pub(super) fn recover_effect(&mut self, n: usize, shard: ShardIdx, job: RecoverJob) -> Checked {
        let s = shard as usize;
        if self.nodes[n].hosts[s].epoch > 0 && self.nodes[n].up {
            self.counters.restarts += 1;
        }
        trace!(self, "s{shard} recovers");
        self.http_forget(n, shard);
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

    /// Reads back every conversation of a fresh incarnation and, on the mesh's shard, replays
    /// every inbox (checkers 1, 2 and 6), on sessions of its own that it closes again.
    pub(super) fn audit(&mut self, n: usize, shard: ShardIdx) -> Checked {
        let s = shard as usize;
        let audit = self.nodes[n].new_session();
        for conv in self.nodes[n].model.conv_names() {
            if self.conv_shard(&conv) != shard {
                continue;
            }
            let read = ShardOp::Read {
                r: 0,
                mesh: MESH.into(),
                conv: conv.clone(),
                from: 1,
                limit: fabric_proto::READ_LIMIT_MAX,
            };
            self.nodes[n].hosts[s]
                .driver
                .shard_mut()
                .expect("a recovered shard")
                .handle_requests(
                    self.now,
                    [Request {
                        session: audit,
                        op: read,
                    }],
                );
            let mut got = None;
            while let Some(o) = self.nodes[n].hosts[s]
                .driver
                .shard_mut()
                .expect("a recovered shard")
                .poll_output()
            {
                match o.reply {
                    Reply::Messages { events, head, .. } => got = Some((events, head)),
                    r => {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("audit read got {r:?}"),
                        )
                    }
                }
            }
            let Some((events, head)) = got else {
                return fail(ViolationKind::UnexpectedReply, "audit read got no reply");
            };
            self.nodes[n].model.audit_conv(&conv, &events, head)?;
        }
        if shard == self.mesh_shard {
            for local in 0..self.nodes[n].clients.len() {
                self.audit_inbox(n, local)?;
            }
        }
        trace!(self, "s{shard} audit passed");
        Ok(())
    }

    /// Replays the inbox of node `n`'s `local`-th peer from its cursor on a fresh
    /// incarnation of the mesh's shard.
    pub(super) fn audit_inbox(&mut self, n: usize, local: usize) -> Checked {
        let s = self.mesh_shard as usize;
        let c = self.nodes[n].clients[local];
        let session = self.nodes[n].new_session();
        let hello = ShardOp::Hello {
            mesh: MESH.into(),
            peer: self.clients[c].peer.clone(),
            token: self.clients[c].token.clone(),
            proof: None,
        };
        self.nodes[n].hosts[s]
            .driver
            .shard_mut()
            .expect("a recovered shard")
            .handle_requests(self.now, [Request { session, op: hello }]);
        let mut cursor = None;
        let mut shown = BTreeSet::new();
        loop {
            let mut frames = 0;
            while let Some(o) = self.nodes[n].hosts[s]
                .driver
                .shard_mut()
                .expect("a recovered shard")
                .poll_output()
            {
                match o.reply {
                    Reply::Frame(ServerOp::Welcome { acked, head, .. }) => {
                        self.nodes[n].model.on_welcome(local, acked, head)?;
                        cursor = Some(acked);
                    }
                    Reply::Frame(ServerOp::Deliver {
                        pos,
                        from,
                        to,
                        body,
                        ..
                    }) => {
                        self.nodes[n]
                            .model
                            .on_deliver(local, pos, &from, &to, &body)?;
                        if shown.last().is_some_and(|l| *l >= pos) {
                            return fail(
                                ViolationKind::WrongRecord,
                                format!(
                                    "audit replay of {} out of order at pos {pos}",
                                    self.clients[c].peer
                                ),
                            );
                        }
                        shown.insert(pos);
                        frames += 1;
                    }
                    r => {
                        return fail(
                            ViolationKind::UnexpectedReply,
                            format!("audit hello got {r:?}"),
                        )
                    }
                }
            }
            if frames == 0 {
                break;
            }
            let flushed = ShardOp::Flushed { frames };
            self.nodes[n].hosts[s]
                .driver
                .shard_mut()
                .expect("a recovered shard")
                .handle_requests(
                    self.now,
                    [Request {
                        session,
                        op: flushed,
                    }],
                );
        }
        let Some(acked) = cursor else {
            return fail(ViolationKind::UnexpectedReply, "audit hello got no welcome");
        };
        self.nodes[n].model.audit_inbox(local, acked, &shown)?;
        self.nodes[n].hosts[s]
            .driver
            .shard_mut()
            .expect("a recovered shard")
            .handle_requests(
                self.now,
                [Request {
                    session,
                    op: ShardOp::Closed,
                }],
            );
        Ok(())
    }
}
