//! Tests of the world's wiring, node by node.

use super::*;
use fabric_proto::{ConvId, MeshId, PeerId};

/// A calm run of one client and no scheduled faults.
fn calm(seed: u64) -> Simulation {
    let options = SimOptions {
        clients: 1,
        ..SimOptions::default()
    };
    Simulation::from_schedule(Schedule {
        seed,
        options,
        events: Vec::new(),
    })
}

fn hello_frame(sim: &Simulation) -> Bytes {
    let mut b = vec![FRAME_TEXT];
    let hello = ClientOp::Hello {
        mesh: MeshId::must(MESH),
        peer: PeerId::must(&sim.clients[0].peer),
        token: sim.clients[0].token.clone(),
    };
    codec::encode_client_json(&hello, &mut b);
    Bytes::from(b)
}

fn resets_queued(sim: &Simulation, id: ConnId) -> usize {
    sim.queue
        .iter()
        .map(|q| &q.event)
        .filter(|e| matches!(e, Event::Packet { conn, seg: Segment::Reset, .. } if *conn == id))
        .count()
}

#[test]
fn a_rebooted_node_resets_an_old_connection_and_accepts_a_new_one() {
    // Proves the network model is faithful across a reboot: a stray first packet of a
    // connection the node had accepted before the crash gets a reset (it would otherwise
    // reopen the connection with its sequence numbers starting over and replay its
    // requests), while a connection whose first packet never reached the node still opens.
    let mut sim = calm(1);
    sim.start().unwrap();
    sim.run_until(500).unwrap();
    let old = sim.clients[0].conn.as_ref().expect("connected").id;
    assert!(
        sim.nodes[0].conns.contains_key(&old),
        "the node accepted it"
    );
    sim.crash_process(0, true).unwrap();
    sim.restart_node(0).unwrap();
    let hello = hello_frame(&sim);
    let seg = Segment::Data {
        seq: 0,
        bytes: hello.clone(),
    };
    sim.node_packet(0, old, 0, seg.clone());
    assert!(
        !sim.nodes[0].conns.contains_key(&old),
        "an old connection reopened"
    );
    assert_eq!(resets_queued(&sim, old), 1);
    let fresh = sim.next_conn;
    sim.next_conn += 1;
    sim.node_packet(0, fresh, 0, seg);
    assert!(
        sim.nodes[0].conns.contains_key(&fresh),
        "a new connection was refused"
    );
    assert_eq!(resets_queued(&sim, fresh), 0);
}

#[test]
fn a_shard_holding_a_closed_session_is_a_leak() {
    // Proves checker 9 can fail: after a calm run ends with every promise kept, a shard
    // that holds state for a session the node no longer has (a subscription whose
    // `Closed` never reached it) is reported as a leaked session.
    let mut sim = calm(2);
    sim.start().unwrap();
    sim.run_until(2_000).unwrap();
    sim.end_faults().unwrap();
    sim.run_until(u64::MAX).unwrap();
    sim.require_finished().unwrap();
    sim.check_no_leaked_sessions(0).unwrap();
    let gone = sim.nodes[0].next_session + 1_000;
    let subscribe = ShardOp::Subscribe {
        r: 1,
        mesh: MeshId::must(MESH),
        conv: ConvId::must("c0"),
        from: 1,
    };
    let now = sim.now;
    sim.nodes[0].hosts[0]
        .driver
        .shard_mut()
        .unwrap()
        .handle_requests(
            now,
            [Request {
                session: gone,
                op: subscribe,
            }],
        );
    let e = sim.check_no_leaked_sessions(0).unwrap_err();
    assert_eq!(e.kind, ViolationKind::LeakedSession, "{e:?}");
}

/// Each host's incarnation count on node `n`.
fn epochs(sim: &Simulation, n: usize) -> Vec<u64> {
    sim.nodes[n].hosts.iter().map(|h| h.epoch).collect()
}

#[test]
fn two_nodes_are_each_driven_and_a_crash_hits_only_the_node_it_names() {
    // Proves the world drives every node, not node 0 alone: with two nodes each node's own
    // clients get acks, and a crash scheduled for n1 takes n1 down and reboots it (its
    // shards recover: new incarnations) while n0 stays up in the incarnation it started in.
    let options = SimOptions {
        nodes: 2,
        clients: 4,
        duration_ms: 4_000,
        client_ops_max: 400,
        ..SimOptions::default()
    };
    let at = |at_ms, event| Timed { at_ms, event };
    let mut sim = Simulation::from_schedule(Schedule {
        seed: 3,
        options,
        events: vec![
            at(1_000, FaultEvent::Crash { node: 1 }),
            at(1_500, FaultEvent::Restart { node: 1 }),
        ],
    });
    assert_eq!(sim.nodes.len(), 2);
    assert_eq!(sim.nodes[0].clients, vec![0, 2]);
    assert_eq!(sim.nodes[1].clients, vec![1, 3]);
    sim.start().unwrap();
    let started = (epochs(&sim, 0), epochs(&sim, 1));
    sim.run_until(1_000).unwrap();
    assert!(!sim.nodes[1].up, "n1 did not crash");
    assert!(sim.nodes[0].up, "the crash of n1 took n0 down");
    let acked_n0 = sim.nodes[0].model.acks();
    sim.run_until(1_400).unwrap();
    assert!(
        sim.nodes[0].model.acks() > acked_n0,
        "n0 stopped answering while n1 was down"
    );
    sim.run_until(1_500).unwrap();
    assert!(sim.nodes[1].up, "n1 did not reboot");
    assert_eq!(epochs(&sim, 0), started.0, "n0 restarted");
    assert!(
        epochs(&sim, 1)
            .iter()
            .zip(&started.1)
            .all(|(now, then)| now > then),
        "n1's shards were not recovered"
    );
    sim.run_until(u64::MAX).unwrap();
    sim.require_finished().unwrap();
    assert_eq!(sim.counters.crashes, 1);
    for n in 0..2 {
        let model = &sim.nodes[n].model;
        for local in 0..model.peers.len() {
            assert!(
                model
                    .ops
                    .iter()
                    .any(|o| o.client == local && !o.acks.is_empty()),
                "n{n}'s client {local} got no ack"
            );
        }
    }
}
