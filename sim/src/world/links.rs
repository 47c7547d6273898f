//! The network between the node and its clients: packets out, and the node's and the clients'
//! ends of each connection taking them in.

use super::*;

impl Simulation {
    pub(super) fn send_to_node(&mut self, c: usize, conn: ConnId, seg: Segment) {
        let faults = self.faults_on();
        let (at, n) = self.net.arrivals(
            self.now,
            &mut self.rng,
            &self.options.net,
            faults,
            Endpoint::Client(c as u32),
            Endpoint::Node(0),
        );
        // The last copy takes the segment itself: most packets have one.
        let mut seg = Some(seg);
        for (i, t) in at[..n].iter().enumerate() {
            let seg = if i + 1 == n { seg.take() } else { seg.clone() }.expect("held");
            self.schedule_at(
                *t,
                Event::ToNode {
                    conn,
                    client: c,
                    seg,
                },
            );
        }
    }

    pub(super) fn send_to_client(&mut self, c: usize, conn: ConnId, seg: Segment) {
        let faults = self.faults_on();
        let (at, n) = self.net.arrivals(
            self.now,
            &mut self.rng,
            &self.options.net,
            faults,
            Endpoint::Node(0),
            Endpoint::Client(c as u32),
        );
        // The last copy takes the segment itself: most packets have one.
        let mut seg = Some(seg);
        for (i, t) in at[..n].iter().enumerate() {
            let seg = if i + 1 == n { seg.take() } else { seg.clone() }.expect("held");
            self.schedule_at(
                *t,
                Event::ToClient {
                    client: c,
                    conn,
                    seg,
                },
            );
        }
    }

    /// A packet reaches the node: an open connection takes it; the first frame of a connection
    /// the node never accepted opens it; anything else gets a reset, as from a host that has no
    /// socket for the connection (after a reboot, or after it closed it; see `known_conns`).
    pub(super) fn node_packet(&mut self, id: ConnId, c: usize, seg: Segment) {
        if !self.node_up {
            return;
        }
        if let Some(k) = self.conns.get_mut(&id) {
            k.stream.handle_segment(self.now, seg);
            self.dirty.insert(id);
            return;
        }
        let opens = matches!(seg, Segment::Data { seq: 0, .. });
        if opens && self.known_conns.insert(id) {
            trace!(self, "n0 accepts connection {id}");
            let session = self.next_session;
            self.next_session += 1;
            let mut stream = Stream::new(self.now, self.options.stream.clone());
            stream.handle_segment(self.now, seg);
            let mut core = Session::new(session, self.now, self.session_config.clone());
            // The nonce a key hello on this session must sign: the node's glue draws it from
            // the OS RNG, the simulator from the run's.
            core.set_challenge_nonce(self.now, self.rng.random());
            self.conns.insert(
                id,
                NodeConn {
                    client: c,
                    stream,
                    session: core,
                    router: self.placement.clone(),
                    timer_at: None,
                    replies: VecDeque::new(),
                },
            );
            self.sessions.insert(session, id);
            self.dirty.insert(id);
        } else if seg != Segment::Reset {
            trace!(self, "n0 resets connection {id}: no socket for it");
            self.send_to_client(c, id, Segment::Reset);
        }
    }

    pub(super) fn client_packet(&mut self, c: usize, id: ConnId, seg: Segment) -> Checked {
        let now = self.now;
        match self.clients[c].conn.as_mut().filter(|k| k.id == id) {
            Some(k) => {
                k.stream.handle_segment(now, seg);
                self.pump_client(c)
            }
            None => {
                // A connection the client has given up on: tell the node, as TCP would.
                if seg != Segment::Reset {
                    self.send_to_node(c, id, Segment::Reset);
                }
                Ok(())
            }
        }
    }
}
