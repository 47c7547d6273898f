//! Membership changes of a running cluster of real `fabric serve` processes: `fabric cluster
//! add-node` brings a fourth node in while appends go on (every group adds it as a learner,
//! catches it up and promotes it), `fabric cluster remove-node` takes a founder out (its
//! leaderships handed on), and the cluster without it holds and takes every append; new
//! sessions' `welcome` names the members as they are.

mod common;

use common::cluster::{
    append, assert_holds_every_append, cluster_cmd, demo_peer, wait_groups, Cluster,
};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_and_a_founder_removed_while_appends_go_on_lose_no_append() {
    // Proves add-node and remove-node end to end on real processes: node 4 joins (its
    // config written, recorded in the metadata group) and becomes a voter of every group,
    // holding every append made before and during its catch-up; node 1 leaves every group;
    // nodes 2, 3 and 4 then take appends and each holds every acknowledged one.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut c = Cluster::start(3);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(30))
        .await;
    let token = demo_peer(&c, &http).await;
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for n in 1..=30u64 {
        acked.insert(n, append(&c, &http, &token, (n % 3 + 1) as u16, n).await);
    }
    let said = cluster_cmd(&c, &["add-node", "--url", &c.url(2, "")]);
    assert!(said.contains("node 4 added"), "{said}");
    let child = c.spawn(4);
    c.nodes.push(Some(child));
    for n in 31..=60u64 {
        acked.insert(n, append(&c, &http, &token, (n % 3 + 1) as u16, n).await);
    }
    wait_groups(&c, &http, 1, &[1, 2, 3, 4], Duration::from_secs(30)).await;
    let v = c.admin(http.get(c.url(1, "/v1/cluster"))).await;
    assert_eq!(
        v["meta"]["learners"],
        serde_json::json!([]),
        "promoted: no learner left"
    );
    c.wait_ready(&http, &[4], Duration::from_secs(30)).await;
    assert_holds_every_append(&c, &http, &token, 4, "local", &acked).await;
    // Node 1 links to the new member, and its metrics have a series for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http
            .get(c.metrics_url(1))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if text
            .lines()
            .any(|l| l == "fabric_node_link_up{peer=\"4\"} 1")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 1's link to node 4 up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let said = cluster_cmd(&c, &["remove-node", "--url", &c.url(3, ""), "--id", "1"]);
    assert!(said.contains("node 1 removed"), "{said}");
    wait_groups(&c, &http, 2, &[2, 3, 4], Duration::from_secs(30)).await;
    // The removed node learns it left (a member closes its link saying so) and says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = http.get(c.url(1, "/readyz")).send().await;
        let said = match r {
            Ok(r) if r.status() == 503 => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        if said.contains("removed from the cluster") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 1's /readyz names its removal: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.kill(1);
    for n in 61..=90u64 {
        acked.insert(n, append(&c, &http, &token, (n % 3 + 2) as u16, n).await);
    }
    assert_holds_every_append(&c, &http, &token, 4, "linearizable", &acked).await;
    for i in [2, 3, 4] {
        assert_holds_every_append(&c, &http, &token, i, "local", &acked).await;
    }
    let v = c.admin(http.get(c.url(3, "/v1/cluster"))).await;
    let ids: Vec<u64> = v["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["id"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![2, 3, 4], "the metadata group's members");
    assert_eq!(v["meta"]["changes"], 2, "two changes recorded");
    // A new session's welcome names the members as they are now.
    let cfg = fabric::client::ClientConfig::new(&c.url(3, ""), "demo", "alice", &token);
    let client = fabric::client::Client::connect(cfg)
        .await
        .expect("a session");
    let nodes: Vec<String> = client.nodes().iter().map(|n| n.to_string()).collect();
    assert_eq!(nodes, [2, 3, 4].map(|i| c.url(i, "")).to_vec());
}
