//! A replicated cluster of real `fabric serve` processes on loopback, as `fabric cluster
//! init` writes it: any node takes writes, every acknowledged append survives the SIGKILL of a
//! shard's leader, and a killed node rejoins; every node's Raft metrics agree on each shard's
//! leader and term, and the leader reports its followers' lag. A node whose log has a flipped
//! bit repairs from the leader.

mod common;

use common::cluster::{append, assert_holds_every_append, read_all, ready_demo_cluster, Cluster};
use fabric::client::{Client, ClientConfig, Incoming};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A Rust client of alice given a URL list that starts with a dead port, then node `i`, then
/// the others: it passes over the dead one, lands on node `i`, and the welcome names all
/// three nodes.
async fn client_on(c: &Cluster, token: &str, i: u16) -> Client {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let mut urls = vec![format!("http://127.0.0.1:{dead}"), c.url(i, "")];
    urls.extend((1..=3).filter(|j| *j != i).map(|j| c.url(j, "")));
    let cfg = ClientConfig::new(&urls.join(","), "demo", "alice", token);
    let client = Client::connect(cfg)
        .await
        .expect("a node takes the session");
    assert_eq!(client.url(), c.url(i, ""), "the dead port passed over");
    let nodes: Vec<String> = client.nodes().iter().map(|n| n.to_string()).collect();
    assert_eq!(nodes, (1..=3).map(|j| c.url(j, "")).collect::<Vec<_>>());
    client
}

/// Sends `tag` to alice herself (a keyed send, retried while the shard has no leader) and
/// reads its delivery: the delivery's `pos`.
async fn send_to_self(client: &Client, tag: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = serde_json::json!({ "tag": tag });
    loop {
        match client.send_keyed("alice", &body, tag).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "send {tag}: {e}"),
        }
        if !client.is_connected() {
            let _ = client.reconnect().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let next = tokio::time::timeout_at(deadline.into(), client.next_delivery()).await;
        match next.expect("the delivery in time") {
            Some(Incoming::Deliver { pos, body, .. }) if body.as_str().contains(tag) => return pos,
            Some(_) => {}
            // The session ended (its node lost the shard's leader): resume; an unacked
            // message is delivered again.
            None => {
                let _ = client.reconnect().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// With node `victim` killed, the client's session is gone; `reconnect` moves to the next
/// node of its list and the inbox goes on from there, past `first`.
async fn the_client_moves_to_the_next_node(c: &Cluster, client: &Client, victim: u16, first: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = client.reconnect().await {
        assert!(Instant::now() < deadline, "reconnect in time: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(client.url(), c.url(victim, ""));
    let second = send_to_self(client, "after").await;
    assert!(second > first, "the inbox goes on: {first} then {second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_every_acknowledged_append_through_a_leader_kill() {
    // Proves, on real processes and real QUIC node links with mutual TLS: appends through any
    // node are acknowledged once a quorum holds them; SIGKILL of a shard's leader loses none of
    // them, a new leader takes writes (clients retry with their keys), the killed node rejoins,
    // and every node then reads the same dense log holding every acknowledged append once.
    // Every node's /metrics agrees on each shard's single leader and term, the leader reports
    // its two followers' lag, and the survivors count the leader change and the election the
    // kill caused.
    let (http, mut c, token) = ready_demo_cluster(false).await;
    let mut acked = std::collections::BTreeMap::new();
    for n in 1..=30u64 {
        acked.insert(n, append(&c, &http, &token, (n % 3 + 1) as u16, n).await);
    }
    let view = c.admin(http.get(c.url(1, "/v1/cluster"))).await;
    let leaders: Vec<u64> = view["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|s| s["leader"].as_u64())
        .collect();
    let victim = leaders[0] as u16;
    let (_, before) = raft_metrics_agree(&c, &http, SHARDS).await;
    let client = client_on(&c, &token, victim).await;
    let first = send_to_self(&client, "before").await;
    c.kill(victim);
    let survivor = if victim == 1 { 2 } else { 1 };
    for n in 31..=60u64 {
        acked.insert(n, append(&c, &http, &token, survivor, n).await);
    }
    the_client_moves_to_the_next_node(&c, &client, victim, first).await;
    c.restart(victim);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(30))
        .await;
    let (_, after) = raft_metrics_agree(&c, &http, SHARDS).await;
    assert_survivors_counted_the_kill(&before, &after, victim);
    // A local read shows each node's replica: every one holds every acknowledged append.
    for (i, consistency) in (1..=3u16).flat_map(|i| [(i, "linearizable"), (i, "local")]) {
        assert_holds_every_append(&c, &http, &token, i, consistency, &acked).await;
    }
}

/// Shards of every node `cluster init` writes.
const SHARDS: u32 = fabric::cluster::init::SHARDS_DEFAULT;

/// On each shard `victim` led in `before`: every other node's leader changes rose by `after`,
/// and so did the elections they started between them.
fn assert_survivors_counted_the_kill(
    before: &[BTreeMap<String, Vec<Series>>],
    after: &[BTreeMap<String, Vec<Series>>],
    victim: u16,
) {
    let led: Vec<u32> = (0..SHARDS)
        .filter(|s| {
            of_shard(&before[victim as usize - 1], "fabric_raft_is_leader", *s) == Some(1.0)
        })
        .collect();
    assert!(!led.is_empty(), "node {victim} led a shard");
    for shard in led {
        let mut elections = (0.0, 0.0);
        for i in (1..=before.len()).filter(|i| *i != victim as usize) {
            let at = |s: &[BTreeMap<String, Vec<Series>>], name: &str| {
                of_shard(&s[i - 1], name, shard).expect("a series")
            };
            let changes = "fabric_raft_leader_changes_total";
            assert!(
                at(after, changes) > at(before, changes),
                "node {i} shard {shard}"
            );
            elections.0 += at(before, "fabric_raft_elections_total");
            elections.1 += at(after, "fabric_raft_elections_total");
        }
        assert!(
            elections.1 > elections.0,
            "shard {shard} elections {elections:?}"
        );
    }
}

/// One series of a scrape: its labels and value.
type Series = (BTreeMap<String, String>, f64);

/// Node `i`'s `/metrics`: each metric name to its series (empty if the scrape failed).
async fn scrape(c: &Cluster, http: &reqwest::Client, i: u16) -> BTreeMap<String, Vec<Series>> {
    let mut out: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    let Ok(r) = http.get(c.metrics_url(i)).send().await else {
        return out;
    };
    let text = r.text().await.unwrap_or_default();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let labels = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        let value = value.parse().expect("a number");
        out.entry(name.to_string())
            .or_default()
            .push((labels, value));
    }
    out
}

/// The value of `name{shard=...}` in one scrape.
fn of_shard(s: &BTreeMap<String, Vec<Series>>, name: &str, shard: u32) -> Option<f64> {
    s.get(name)?
        .iter()
        .find(|(l, _)| l.get("shard").map(String::as_str) == Some(&shard.to_string()))
        .map(|(_, v)| *v)
}

/// The followers node `i` reports lag for on `shard`.
fn lag_followers(s: &BTreeMap<String, Vec<Series>>, shard: u32) -> BTreeSet<u16> {
    let series = s.get("fabric_raft_follower_lag_entries");
    series
        .into_iter()
        .flatten()
        .filter(|(l, _)| l.get("shard") == Some(&shard.to_string()))
        .filter_map(|(l, _)| l.get("follower")?.parse().ok())
        .collect()
}

/// Whether the scrapes of nodes 1..=n agree on `shard`: exactly one reports itself leader,
/// every one knows a leader, applied entries, and the same term, has seen a leader change and
/// its links to the other nodes up; the leader (returned) reports lag for exactly the other
/// nodes, the followers for none.
fn shard_agrees(scrapes: &[BTreeMap<String, Vec<Series>>], shard: u32) -> Result<u16, String> {
    let n = scrapes.len() as u16;
    let all = |name: &str| -> Vec<Option<f64>> {
        scrapes.iter().map(|s| of_shard(s, name, shard)).collect()
    };
    let leaders: Vec<u16> = (1..=n)
        .filter(|i| all("fabric_raft_is_leader")[*i as usize - 1] == Some(1.0))
        .collect();
    let [leader] = leaders[..] else {
        return Err(format!("shard {shard}: leaders {leaders:?}"));
    };
    let check = |what: &str, ok: bool| ok.then_some(()).ok_or(format!("shard {shard}: {what}"));
    check(
        "has_leader",
        all("fabric_raft_has_leader")
            .iter()
            .all(|v| *v == Some(1.0)),
    )?;
    let terms = all("fabric_raft_term");
    check(
        "terms",
        terms[0].is_some_and(|t| t > 0.0) && terms.iter().all(|t| *t == terms[0]),
    )?;
    check(
        "applied",
        all("fabric_raft_applied_index")
            .iter()
            .all(|v| v.is_some_and(|v| v > 0.0)),
    )?;
    let changes = all("fabric_raft_leader_changes_total");
    check(
        "leader changes",
        changes.iter().all(|v| v.is_some_and(|v| v >= 1.0)),
    )?;
    let elections: f64 = all("fabric_raft_elections_total").iter().flatten().sum();
    check("elections", elections >= 1.0)?;
    for i in 1..=n {
        let others: BTreeSet<u16> = (1..=n).filter(|o| *o != i).collect();
        let want = if i == leader {
            others.clone()
        } else {
            BTreeSet::new()
        };
        let got = lag_followers(&scrapes[i as usize - 1], shard);
        check(&format!("node {i} lag series {got:?}"), got == want)?;
        check(
            &format!("node {i} links"),
            links_up(&scrapes[i as usize - 1], &others),
        )?;
    }
    Ok(leader)
}

/// Whether a scrape shows its node link up, with an RTT, to each of `peers`.
fn links_up(s: &BTreeMap<String, Vec<Series>>, peers: &BTreeSet<u16>) -> bool {
    let peers_with = |name: &str| -> BTreeSet<u16> {
        s.get(name)
            .into_iter()
            .flatten()
            .filter(|(_, v)| *v > 0.0)
            .filter_map(|(l, _)| l.get("peer")?.parse().ok())
            .collect()
    };
    peers_with("fabric_node_link_up") == *peers
        && peers_with("fabric_node_link_rtt_seconds") == *peers
}

/// Scrapes every live node until each of `shards` shards agrees ([`shard_agrees`]), at most
/// 20 s: each shard's leader and the scrapes.
async fn raft_metrics_agree(
    c: &Cluster,
    http: &reqwest::Client,
    shards: u32,
) -> (Vec<u16>, Vec<BTreeMap<String, Vec<Series>>>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut scrapes = Vec::new();
        for i in 1..=c.nodes.len() as u16 {
            scrapes.push(scrape(c, http, i).await);
        }
        let agreed: Result<Vec<u16>, String> =
            (0..shards).map(|s| shard_agrees(&scrapes, s)).collect();
        match agreed {
            Ok(leaders) => return (leaders, scrapes),
            Err(why) => assert!(Instant::now() < deadline, "raft metrics agree: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flips one bit in the first record of the oldest segment of every shard of node `i` whose
/// oldest segment holds more than one write (a flip in the only write would be cut as torn);
/// the shards hit.
fn flip_a_synced_bit(c: &Cluster, i: u16) -> Vec<u32> {
    use fabric_shard::wal;
    let data = c.dir.path().join(format!("node-{i}/data"));
    let mut hit = Vec::new();
    for shard in 0..SHARDS {
        let dir = fabric::storage::shard_dir(&data, shard);
        let mut segs: Vec<_> = std::fs::read_dir(&dir)
            .expect("shard dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segs.sort();
        let Some(oldest) = segs.first() else { continue };
        let mut bytes = std::fs::read(oldest).expect("segment");
        let frames = bytes.windows(4).filter(|w| *w == wal::FRAME_MAGIC).count();
        if frames < 2 {
            continue;
        }
        let at = wal::SEGMENT_HEADER_BYTES + wal::FRAME_HEADER_BYTES + wal::RECORD_HEADER_BYTES;
        bytes[at] ^= 0x04;
        std::fs::write(oldest, &bytes).expect("write back");
        hit.push(shard);
    }
    hit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_flipped_bit_repairs_from_the_leader_and_loses_nothing() {
    // Proves protocol-aware recovery on real processes: a node whose synced log has a flipped
    // bit starts (it does not refuse), reports the shard in repair on /readyz (503, naming the
    // shard) and elects nobody alone; once the others are back it fetches the cut range from
    // the leader, turns ready, removes its REPAIR marker and reads (locally) every acknowledged
    // append, at the same seqs; the cut bytes are kept in quarantine.
    let (http, mut c, token) = ready_demo_cluster(false).await;
    let mut acked = BTreeMap::new();
    for n in 1..=40u64 {
        acked.insert(n, append(&c, &http, &token, (n % 3 + 1) as u16, n).await);
    }
    // Wait until node 2 holds everything, then stop all three and damage node 2's log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_all(&c, &http, &token, 2, "local").await.len() < acked.len() {
        assert!(Instant::now() < deadline, "node 2 caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 1..=3 {
        c.kill(i);
    }
    let hit = flip_a_synced_bit(&c, 2);
    assert!(
        !hit.is_empty(),
        "some shard's oldest segment holds two writes"
    );
    c.restart(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        assert!(Instant::now() < deadline, "node 2 reports its repair");
        if let Ok(r) = http.get(c.url(2, "/readyz")).send().await {
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            let reason = v["reason"].as_str().unwrap_or("").to_string();
            if status == 503 && reason.contains("in repair") {
                break reason;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        hit.iter().any(|s| reason.contains(&format!("shard {s} "))),
        "{reason} names one of {hit:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !c.ready(&http, 2).await,
        "alone and in repair, nobody leads"
    );
    c.restart(1);
    c.restart(3);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(60))
        .await;
    for n in 41..=45u64 {
        acked.insert(n, append(&c, &http, &token, 2, n).await);
    }
    // Writes to conversations all over the shards: the first write a shard makes after its
    // repair ended removes the marker.
    for k in 0..16 {
        let url = c.url(2, &format!("/v1/meshes/demo/conversations/x{k}/messages"));
        let body = serde_json::json!({"body": k});
        let r = http.post(url).bearer_auth(&token).json(&body).send().await;
        assert!(r.is_ok_and(|r| r.status() == 201), "append to x{k}");
    }
    assert_holds_every_append(&c, &http, &token, 2, "local", &acked).await;
    let data = c.dir.path().join("node-2/data");
    for shard in &hit {
        let dir = fabric::storage::shard_dir(&data, *shard);
        let deadline = Instant::now() + Duration::from_secs(30);
        while dir.join(fabric_shard::repair::REPAIR_FILE).exists() {
            assert!(Instant::now() < deadline, "shard {shard}: REPAIR removed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kept = std::fs::read_dir(dir.join("quarantine")).map_or(0, |d| d.count());
        assert!(kept > 0, "shard {shard}: the cut bytes are in quarantine");
    }
}

/// Retries `op` (a keyed write) while it fails, for up to 30 s, on the same session: the
/// test fails if the session ends.
async fn retry_on_session<F, Fut>(client: &Client, what: &str, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, fabric::client::ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = op().await {
        assert!(client.is_connected(), "{what}: the session ended: {e}");
        assert!(Instant::now() < deadline, "{what}: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_follower_node_outlives_the_leaders_kill_without_a_reconnect() {
    // Proves a session survives a leader change: a client on a node that does not lead its
    // mesh's shard, with a subscription and inbox deliveries, keeps the same session through
    // the SIGKILL of the leader (no reconnect, no close), and afterwards receives what was
    // sent and appended since: each pos once, increasing, and each event once, in order.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut c = Cluster::start_shards(3, false, 1);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(30))
        .await;
    let token = common::cluster::demo_peer(&c, &http).await;
    let view = c.admin(http.get(c.url(1, "/v1/cluster"))).await;
    let leader = view["shards"][0]["leader"].as_u64().expect("a leader") as u16;
    let home = leader % 3 + 1;
    let client = client_on(&c, &token, home).await;
    let session = client.session();
    let first = send_to_self(&client, "before").await;
    client.subscribe("talk", 1).await.expect("subscribed");
    for k in 1..=3u64 {
        let (body, key) = (serde_json::json!({ "n": k }), format!("t{k}"));
        retry_on_session(&client, "append", || {
            client.append("talk", &body, Some(&key))
        })
        .await;
    }
    let (mut positions, mut seqs) = (vec![first], Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while seqs.len() < 3 {
        let next = tokio::time::timeout_at(deadline.into(), client.next_delivery()).await;
        match next.expect("the events in time") {
            Some(Incoming::Deliver { pos, .. }) => positions.push(pos),
            Some(Incoming::Event { seq, .. }) => seqs.push(seq),
            None => panic!("the session ended before the kill"),
        }
    }
    c.kill(leader);
    let body = serde_json::json!({ "tag": "after" });
    retry_on_session(&client, "send", || {
        client.send_keyed("alice", &body, "after")
    })
    .await;
    let body = serde_json::json!({ "n": 4 });
    retry_on_session(&client, "append", || {
        client.append("talk", &body, Some("t4"))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seqs.last() != Some(&4) || !positions.iter().any(|p| *p > first) {
        let next = tokio::time::timeout_at(deadline.into(), client.next_delivery()).await;
        match next.expect("the deliveries in time") {
            Some(Incoming::Deliver { pos, .. }) => positions.push(pos),
            Some(Incoming::Event { seq, .. }) => seqs.push(seq),
            None => panic!("the session ended at the leader change"),
        }
    }
    assert_eq!(client.session(), session, "the same session throughout");
    assert!(client.is_connected());
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "each pos once, increasing: {positions:?}"
    );
    assert_eq!(seqs, vec![1, 2, 3, 4], "each event once, in order");
    let s = scrape(&c, &http, home).await;
    let attached: f64 = s
        .get("fabric_session_reattaches_total")
        .into_iter()
        .flatten()
        .filter(|(l, _)| l.get("result").map(String::as_str) == Some("attached"))
        .map(|(_, v)| *v)
        .sum();
    assert!(attached >= 1.0, "the metric counts the session taken up");
}
