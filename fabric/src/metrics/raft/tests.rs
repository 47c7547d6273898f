use super::*;

fn leader_of_three(node: NodeId, leader: Option<NodeId>) -> ReplicaStatus {
    ReplicaStatus {
        node,
        term: 4,
        leader,
        commit: 90,
        applied: 88,
        last_index: 100,
        leading: leader == Some(node),
        voters: vec![1, 2, 3],
        learners: vec![],
        matched: vec![(1, 100), (2, 97), (3, 40)],
        ..ReplicaStatus::default()
    }
}

#[test]
fn monotonic_adds_rises_and_all_of_a_count_that_started_again() {
    // Proves a count's rises become increments, an unchanged count adds nothing, and a count
    // that went down (its shard restarted) adds all it counted since, never a negative step.
    let mut m = Monotonic::default();
    assert_eq!(m.advance(3), 3);
    assert_eq!(m.advance(3), 0);
    assert_eq!(m.advance(5), 2);
    assert_eq!(m.advance(1), 1);
    assert_eq!(m.advance(4), 3);
}

#[test]
fn elections_count_terms_this_node_campaigned_in_only() {
    // Proves a term rise seen as candidate (or as a one-voter leader) counts one election, a
    // candidate that stays in its term or wins it counts no more, a pre-vote or a term learned
    // as follower counts none, and the first observation (a host that just started) none.
    let mut e = ElectionCounter::default();
    e.observe(5, Role::Candidate);
    assert_eq!(e.elections, 0, "first sight");
    e.observe(5, Role::PreCandidate);
    e.observe(6, Role::Candidate);
    assert_eq!(e.elections, 1);
    e.observe(6, Role::Candidate);
    e.observe(6, Role::Leader);
    assert_eq!(e.elections, 1, "the same election");
    e.observe(9, Role::Follower);
    assert_eq!(e.elections, 1, "a term learned from another node");
    e.observe(10, Role::Leader);
    assert_eq!(
        e.elections, 2,
        "a one-voter group wins in the step it campaigns"
    );
}

#[test]
fn lag_series_are_rendered_on_the_leader_for_each_follower_only() {
    // Proves the leader of a shard renders one lag series per follower (its last index minus
    // the follower's match index, never itself), a follower or a shard without a published
    // view renders none, and nothing at all (no HELP line) is rendered when no shard is led.
    let mut out = String::new();
    render_lag(
        &mut out,
        &[
            Some(leader_of_three(1, Some(1))),
            None,
            Some(leader_of_three(2, Some(1))),
        ],
    );
    let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        series,
        [
            "fabric_raft_follower_lag_entries{shard=\"0\",follower=\"2\"} 3",
            "fabric_raft_follower_lag_entries{shard=\"0\",follower=\"3\"} 60",
            "",
        ]
    );
    assert!(out.contains("# TYPE fabric_raft_follower_lag_entries gauge\n"));
    let mut none = String::new();
    render_lag(&mut none, &[Some(leader_of_three(2, Some(1))), None]);
    assert_eq!(none, "");
}

#[test]
fn a_scrape_sets_the_shard_gauges_and_counts_leader_changes_across_a_restart() {
    // Proves the gauges follow the published view (is_leader only on the leader, has_leader
    // whenever one is known, repairing while in repair) and the leader-change counter only rises, through a restart that
    // started the replica's own count again.
    let text = rendered_after(|r, m| {
        let mut view = leader_of_three(2, Some(1));
        view.leader_changes = 2;
        m.set(
            r,
            &ClusterScrape {
                replicas: vec![Some(view.clone())],
                links: Vec::new(),
            },
        );
        view.leader_changes = 1;
        view.leader = None;
        view.repair_through = Some(120);
        m.set(
            r,
            &ClusterScrape {
                replicas: vec![Some(view)],
                links: Vec::new(),
            },
        );
    });
    for line in [
        "fabric_raft_term{shard=\"0\"} 4",
        "fabric_raft_commit_index{shard=\"0\"} 90",
        "fabric_raft_applied_index{shard=\"0\"} 88",
        "fabric_raft_is_leader{shard=\"0\"} 0",
        "fabric_raft_has_leader{shard=\"0\"} 0",
        "fabric_raft_repairing{shard=\"0\"} 1",
        "fabric_raft_leader_changes_total{shard=\"0\"} 3",
        "fabric_node_link_up{peer=\"1\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[test]
fn link_resets_become_a_counter_per_peer_that_only_rises() {
    // Proves fabric_node_link_resets_total follows each peer's reset count across scrapes,
    // adds nothing when it is unchanged, and keeps rising when the count starts again (the
    // member left and joined again).
    let text = rendered_after(|r, m| {
        let peer = |id: NodeId, resets: u64| PeerStatus {
            id,
            link: "127.0.0.1:1".parse().unwrap(),
            up: true,
            last_frame_ms: None,
            connections: resets + 1,
            rtt: None,
            resets,
        };
        for resets in [2, 5, 5, 1] {
            let scrape = ClusterScrape {
                replicas: vec![None],
                links: vec![peer(1, resets), peer(3, 0)],
            };
            m.set(r, &scrape);
        }
    });
    for line in [
        "fabric_node_link_resets_total{peer=\"1\"} 6",
        "fabric_node_link_resets_total{peer=\"3\"} 0",
        "fabric_node_link_up{peer=\"1\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

/// Node 2 of a three-node cluster's Raft series (one shard) on a recorder of their own: `scrape`
/// sets them; the exposition comes back.
fn rendered_after(scrape: impl FnOnce(&Registrar<'_>, &RaftMetrics)) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let r = Registrar {
        recorder: Some(&recorder),
    };
    let labels = ClusterLabels {
        node: 2,
        peers: vec![1, 3],
    };
    let m = RaftMetrics::register(&r, 1, &labels);
    scrape(&r, &m);
    handle.render()
}
