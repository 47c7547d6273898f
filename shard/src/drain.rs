//! Drains: pushing durable inbox messages and conversation events to sessions, within each
//! session's push credit, a bounded number of log entries at a time.

use crate::conv::delivered;
use crate::read::{ReadStart, Reader};
use crate::Shard;
use fabric_proto::internal::{Output, Reply, SessionId};
use fabric_proto::ServerOp;

impl Shard {
    /// The next reply for a session: acks and errors first, then pushed deliveries and events.
    pub fn poll_output(&mut self) -> Option<Output> {
        loop {
            if let Some(o) = self.out.pop_front() {
                return Some(o);
            }
            let session = self.drain_queue.pop_front()?;
            self.drain(session);
        }
    }

    /// Pushes durable inbox messages and conversation events to one session, within its credit.
    fn drain(&mut self, session: SessionId) {
        let Some(mut s) = self.sessions.remove(&session) else {
            return;
        };
        s.queued = false;
        let mut scanned = 0usize;
        let mut more = self.drain_inbox(session, &mut s, &mut scanned);
        more |= self.drain_subscriptions(session, &mut s, &mut scanned);
        self.sessions.insert(session, s);
        if more {
            self.queue_drain(session);
        }
    }

    /// The inbox part of a drain; true if it stopped at its scan budget with credit left.
    fn drain_inbox(
        &mut self,
        session: SessionId,
        s: &mut crate::SessionState,
        scanned: &mut usize,
    ) -> bool {
        let scan_max = self.config.drain_scan_entries_max;
        let mut more = false;
        if s.inbox_reading.is_some() {
            return false;
        }
        let Some((mesh, peer, next)) = s.inbox.as_mut() else {
            return false;
        };
        let mut fill = None;
        let Some(m) = self.meshes.get(mesh) else {
            return false;
        };
        let mut delivered_upto = m.peers[*peer as usize].delivered_upto;
        let mut last = *next;
        let visible = if *next <= m.durable_pos {
            m.log.range(*next..=m.durable_pos)
        } else {
            m.log.range(0..0)
        };
        for (&pos, msg) in visible {
            if s.credit == 0 || *scanned >= scan_max {
                more = s.credit > 0;
                break;
            }
            if !m.is_recipient(msg, *peer) {
                *scanned += 1;
                last = pos + 1;
                continue;
            }
            let Some(body) = msg.body.clone() else {
                // On disk only: read it back, then go on from here.
                fill = Some(msg.at);
                break;
            };
            *scanned += 1;
            last = pos + 1;
            debug_assert!(pos <= m.durable_pos, "only durable messages are delivered");
            s.credit -= 1;
            self.stats.deliveries += 1;
            if pos <= delivered_upto {
                self.stats.redeliveries += 1;
            } else {
                delivered_upto = pos;
            }
            let deliver = ServerOp::Deliver {
                pos,
                from: m.peers[msg.from as usize].id.clone(),
                to: m.wire_target(&msg.to),
                body,
                ts: msg.ts,
            };
            let reply = Reply::Frame(deliver);
            self.out.push_back(Output { session, reply });
        }
        if !more && s.credit > 0 && fill.is_none() {
            last = last.max(m.durable_pos + 1);
        }
        *next = last;
        self.end_inbox_drain(session, s, delivered_upto, fill);
        more
    }

    /// Keeps how far this incarnation delivered to the peer (to count redeliveries), and asks
    /// for the bodies on disk the drain stopped at.
    fn end_inbox_drain(
        &mut self,
        session: SessionId,
        s: &mut crate::SessionState,
        delivered_upto: u64,
        fill: Option<(u64, u64)>,
    ) {
        let Some((mesh, peer, _)) = s.inbox.clone() else {
            return;
        };
        if let Some(m) = self.meshes.get_mut(&mesh) {
            m.peers[peer as usize].delivered_upto = delivered_upto;
        }
        if let Some(at) = fill {
            self.fill_for_session(session, s, &mesh, at);
        }
    }

    /// The subscriptions part of a drain: entries from the log cache, and a disk read for a
    /// subscription whose next entry is older than the cache. True if it stopped at its scan
    /// budget with credit left.
    fn drain_subscriptions(
        &mut self,
        session: SessionId,
        s: &mut crate::SessionState,
        scanned: &mut usize,
    ) -> bool {
        let scan_max = self.config.drain_scan_entries_max;
        let mut more = false;
        let mut from_disk = Vec::new();
        for (i, sub) in s.subs.iter_mut().enumerate() {
            let Some(c) = self.convs.get(&sub.key) else {
                continue;
            };
            sub.next_seq = sub.next_seq.max(c.first_seq);
            if sub.reading.is_some() {
                continue;
            }
            while sub.next_seq <= c.durable_seq {
                if s.credit == 0 || *scanned >= scan_max {
                    more |= s.credit > 0;
                    break;
                }
                let Some(e) = c.cached(sub.next_seq) else {
                    from_disk.push(i);
                    break;
                };
                s.credit -= 1;
                *scanned += 1;
                self.stats.events_pushed += 1;
                self.out.push_back(Output {
                    session,
                    reply: Reply::Frame(ServerOp::Event(delivered(&sub.key.1, e))),
                });
                sub.next_seq += 1;
            }
        }
        for i in from_disk {
            if s.credit == 0 {
                break;
            }
            let sub = &mut s.subs[i];
            let at = sub
                .resume
                .filter(|(seq, _)| *seq == sub.next_seq)
                .map(|(_, at)| at);
            let key = sub.key.clone();
            let started = self.start_read(
                Reader::Sub(session),
                &key,
                sub.next_seq,
                s.credit as u64,
                at,
            );
            if let ReadStart::Started(id) = started {
                s.subs[i].reading = Some(id);
            }
        }
        more
    }
}
