//! The scripted API users write their own deterministic tests with (`fabric_sim::script`):
//! peers that connect, send, go offline and come back, under crashes and partitions.

use fabric_sim::script::MeshSim;

#[test]
fn an_offline_peer_gets_its_messages_after_a_crash_and_a_partition() {
    // Proves what a user can assert with MeshSim: messages sent to an offline peer survive a
    // power loss and reach it when it comes back, exactly once per position; a partitioned
    // group member still gets the group message after the heal; appends are acknowledged.
    let mut sim = MeshSim::builder(7)
        .peer("alice", &["ops"])
        .peer("bob", &["ops"])
        .peer("carol", &["ops"])
        .build()
        .expect("set up");
    let (alice, bob, carol) = (sim.id("alice"), sim.id("bob"), sim.id("carol"));
    sim.run_for(200).unwrap();
    sim.go_offline(bob);
    for i in 0..3 {
        sim.send(alice, "bob", &format!(r#"{{"n":{i}}}"#)).unwrap();
    }
    sim.append(alice, "standup", r#"{"text":"day 1"}"#, Some("k1"))
        .unwrap();
    sim.run_for(500).unwrap();
    assert_eq!(sim.acks(), 4, "three sends and an append acknowledged");
    sim.crash_node();
    sim.run_for(300).unwrap();
    sim.restart_node();
    sim.partition(&[carol], false);
    sim.send(alice, "group:ops", r#"{"text":"all hands"}"#)
        .unwrap();
    sim.run_for(2_000).unwrap();
    sim.heal();
    sim.come_back(bob);
    sim.settle().expect("every promise kept");

    let to_bob: Vec<_> = sim.received(bob).into_iter().map(|m| m.body).collect();
    assert_eq!(
        to_bob,
        vec![
            serde_json::json!({"n":0}),
            serde_json::json!({"n":1}),
            serde_json::json!({"n":2}),
            serde_json::json!({"text":"all hands"}),
        ]
    );
    let to_carol = sim.received(carol);
    assert_eq!(to_carol.len(), 1);
    assert_eq!(to_carol[0].from, "alice");
    assert_eq!(to_carol[0].to, "group:ops");
    let to_alice = sim.received(alice);
    assert_eq!(
        to_alice.len(),
        1,
        "a group message reaches every member, its sender too"
    );
    assert_eq!(to_alice[0].body, serde_json::json!({"text":"all hands"}));
}

#[test]
fn scripted_runs_are_deterministic() {
    // Proves a script replays exactly for a seed: the same received positions twice.
    let run = || {
        let mut sim = MeshSim::builder(3)
            .peer("a", &[])
            .peer("b", &[])
            .build()
            .unwrap();
        let (a, b) = (sim.id("a"), sim.id("b"));
        for i in 0..20 {
            sim.send(a, "*", &format!("{i}")).unwrap();
        }
        sim.run_for(50).unwrap();
        sim.crash_node();
        sim.restart_node();
        sim.settle().unwrap();
        sim.received(b).iter().map(|m| m.pos).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}
