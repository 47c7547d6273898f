//! Network wiring: packets onto the simulated network between two endpoints, and the ends of
//! each connection taking them in. Every link is a pair of endpoints (`crate::net`): a client
//! and the node it is attached to, and, once nodes talk to each other (replication), two
//! nodes; partitions and clogs name either kind.

use super::*;

impl Simulation {
    /// Puts `seg` of connection `conn` on the link from `from` to `to`: each copy the network
    /// delivers (none if it is lost or blocked, two if duplicated) arrives as an event.
    pub(super) fn send_packet(&mut self, from: Endpoint, to: Endpoint, conn: ConnId, seg: Segment) {
        let faults = self.faults_on();
        let (at, n) =
            self.net
                .arrivals(self.now, &mut self.rng, &self.options.net, faults, from, to);
        // The last copy takes the segment itself: most packets have one.
        let mut seg = Some(seg);
        for (i, t) in at[..n].iter().enumerate() {
            let seg = if i + 1 == n { seg.take() } else { seg.clone() }.expect("held");
            self.schedule_at(
                *t,
                Event::Packet {
                    from,
                    to,
                    conn,
                    seg,
                },
            );
        }
    }

    /// From client `c` to the node it is attached to.
    pub(super) fn send_to_node(&mut self, c: usize, conn: ConnId, seg: Segment) {
        let node = self.clients[c].node;
        self.send_packet(
            Endpoint::Client(c as u32),
            Endpoint::Node(node as u32),
            conn,
            seg,
        );
    }

    /// From node `n` to client `c`.
    pub(super) fn send_to_client(&mut self, n: usize, c: usize, conn: ConnId, seg: Segment) {
        self.send_packet(
            Endpoint::Node(n as u32),
            Endpoint::Client(c as u32),
            conn,
            seg,
        );
    }

    /// A packet arrives at its endpoint.
    pub(super) fn deliver(
        &mut self,
        from: Endpoint,
        to: Endpoint,
        conn: ConnId,
        seg: Segment,
    ) -> Checked {
        match (from, to) {
            (Endpoint::Client(c), Endpoint::Node(n)) => {
                self.node_packet(n as usize, conn, c as usize, seg);
                Ok(())
            }
            (Endpoint::Node(_), Endpoint::Client(c)) => self.client_packet(c as usize, conn, seg),
            // Nothing sends on these links yet: nodes do not replicate, and clients only talk
            // to their node. A packet there is a bug in the simulator.
            (from, to) => fail(
                ViolationKind::UnexpectedReply,
                format!("a packet from {from} to {to}, a link nothing uses yet"),
            ),
        }
    }

    /// A packet reaches node `n`: an open connection takes it; the first frame of a
    /// connection the node never accepted opens it; anything else gets a reset, as from a
    /// host that has no socket for the connection (after a reboot, or after it closed it; see
    /// `Node::known_conns`).
    pub(super) fn node_packet(&mut self, n: usize, id: ConnId, c: usize, seg: Segment) {
        let now = self.now;
        let node = &mut self.nodes[n];
        if !node.up {
            return;
        }
        if let Some(k) = node.conns.get_mut(&id) {
            k.stream.handle_segment(now, seg);
            node.dirty.insert(id);
            return;
        }
        let opens = matches!(seg, Segment::Data { seq: 0, .. });
        if opens && node.known_conns.insert(id) {
            trace!(self, "n{n} accepts connection {id}");
            self.accept(n, id, c, seg);
        } else if seg != Segment::Reset {
            trace!(self, "n{n} resets connection {id}: no socket for it");
            self.send_to_client(n, c, id, Segment::Reset);
        }
    }

    /// Node `n` accepts connection `id` from client `c`, whose first packet is `seg`: a
    /// socket, an edge session and a router for it.
    fn accept(&mut self, n: usize, id: ConnId, c: usize, seg: Segment) {
        let now = self.now;
        let mut stream = Stream::new(now, self.options.stream.clone());
        stream.handle_segment(now, seg);
        let session = self.nodes[n].new_session();
        let mut core = Session::new(session, now, self.session_config.clone());
        // The nonce a key hello on this session must sign: the node's glue draws it from the
        // OS RNG, the simulator from the run's.
        core.set_challenge_nonce(now, self.rng.random());
        let node = &mut self.nodes[n];
        node.conns.insert(
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
        node.sessions.insert(session, id);
        node.dirty.insert(id);
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
