//! Worlds of several nodes under the swarm's faults. With no replication yet each node is a
//! cluster of its own with its own clients; these runs prove the world drives them all, and
//! that schedules generated for several nodes (crashes, partitions, clogs and full disks each
//! naming a node) keep every promise.

use fabric_sim::runner::run_seeds;

/// Seeds of swarm options, each run with 2 or 3 nodes.
const FIRST: u64 = 20_000;
const SEEDS: u64 = 60;

#[test]
fn swarm_seeds_with_several_nodes_keep_every_promise() {
    // Proves a multi-node world passes every checker under generated faults, and that its
    // schedules crash nodes other than n0 (a generator that kept hard-coding node 0 fails).
    let tweak = |o: &mut fabric_sim::SimOptions| {
        o.nodes = 2 + (o.client_ops_max % 2);
        o.clients = o.clients.max(o.nodes as usize);
    };
    let r = run_seeds(FIRST, SEEDS, 2, &tweak, &|_| {});
    for v in &r.first {
        eprintln!("{v}");
    }
    assert_eq!(r.violation_count(), 0, "failing seeds {:?}", r.failing);
    assert!(r.requests_acked > 0 && r.crashes > 0, "{r:?}");
    let crashed_other = (FIRST..FIRST + SEEDS).any(|seed| {
        let mut o = fabric_sim::swarm(seed);
        tweak(&mut o);
        fabric_sim::Schedule::generate(seed, &o).events.iter().any(|t| {
            matches!(t.event, fabric_sim::FaultEvent::Crash { node } | fabric_sim::FaultEvent::Kill { node } if node > 0)
        })
    });
    assert!(crashed_other, "no schedule crashed a node other than n0");
}
