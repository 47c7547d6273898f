//! Real processes, real faults: a 3-node cluster of `fabric serve` processes whose node links
//! run through UDP relays the test switches, under appends kept in flight through all three
//! nodes, while a bounded schedule kills nodes (SIGKILL, a random one or a shard's leader),
//! restarts them, cuts one node off, cuts one direction of a pair, heals, and adds a node
//! (`fabric cluster add-node`, its link direct) and removes it again once every group has it
//! as a voter. At the end every acknowledged append is on every node, at its seq, with dense
//! seqs.

mod common;

use common::cluster::{
    append_anywhere, assert_holds_every_append, cluster_cmd, ready_demo_cluster, wait_groups,
    Cluster,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Appends in flight at once.
const WINDOW: u64 = 8;
/// Rounds of the fault schedule (each kind twice), and then one membership round.
const ROUNDS: u32 = 8;
/// Kinds of fault: kill a random node, kill a shard's leader, cut a node off, cut one
/// direction of a pair.
const FAULT_KINDS: u32 = 4;
/// How long one append may take, retries through other nodes included.
const APPEND_DEADLINE: Duration = Duration::from_secs(60);

/// Keeps `WINDOW` appends in flight until `stop`, recording what was acknowledged.
async fn writer(
    http: reqwest::Client,
    urls: Vec<String>,
    token: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<u64, u64>>>,
) {
    let mut next = 1u64;
    while !stop.load(Ordering::SeqCst) {
        let batch = (next..next + WINDOW).map(|n| {
            let (http, urls, token, acked) = (&http, &urls, &token, acked.clone());
            async move {
                let first = n as usize % urls.len();
                let seq = append_anywhere(http, urls, token, first, n, APPEND_DEADLINE).await;
                acked.lock().expect("no panic holding it").insert(n, seq);
            }
        });
        futures_util::future::join_all(batch).await;
        next += WINDOW;
    }
}

/// The node leading shard `shard` now, as `/v1/cluster` on a live node says.
async fn leader_of(c: &Cluster, http: &reqwest::Client, shard: usize) -> Option<u16> {
    for i in 1..=3u16 {
        if c.nodes[i as usize - 1].is_none() {
            continue;
        }
        let r = http
            .get(c.url(i, "/v1/cluster"))
            .bearer_auth(&c.token)
            .send()
            .await;
        let Ok(r) = r else { continue };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if let Some(l) = v["shards"][shard]["leader"].as_u64() {
            return Some(l as u16);
        }
    }
    None
}

/// The relays really carry the node links: node 3 cut off both ways acknowledges no append
/// (it can reach no quorum), and takes them again once healed.
async fn relays_cut_for_real(c: &Cluster, http: &reqwest::Client, token: &str) {
    let relays = c.relays.as_ref().expect("relayed");
    let post = |body: serde_json::Value| {
        http.post(c.url(3, "/v1/meshes/demo/conversations/probe/messages"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    relays.isolate(3);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let r = post(serde_json::json!({"body": "cut off"})).await;
    assert!(
        r.is_err() || r.is_ok_and(|r| r.status() != 201),
        "an append through a node cut off from its quorum is not acknowledged"
    );
    relays.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(serde_json::json!({"body": "healed", "key": "healed"})).await;
        if r.is_ok_and(|r| r.status() == 201) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 takes appends again after the heal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One round of the schedule: fault `kind` (of [`FAULT_KINDS`]), writes going on under it for
/// a while, then its repair.
async fn fault_round(
    c: &mut Cluster,
    http: &reqwest::Client,
    rng: &mut rand::rngs::StdRng,
    kind: u32,
) {
    let hold = Duration::from_millis(rng.random_range(1_500..3_000));
    let relays = c.relays.as_ref().expect("relayed");
    match kind {
        0 => {
            let victim = rng.random_range(1..=3u16);
            c.kill(victim);
            tokio::time::sleep(hold).await;
            c.restart(victim);
        }
        1 => {
            let victim = leader_of(c, http, 0).await.unwrap_or(1);
            c.kill(victim);
            tokio::time::sleep(hold).await;
            c.restart(victim);
        }
        2 => {
            relays.isolate(rng.random_range(1..=3u16));
            tokio::time::sleep(hold).await;
            relays.heal();
        }
        _ => {
            let a = rng.random_range(1..=3u16);
            let b = a % 3 + 1;
            relays.set(a, b, true);
            tokio::time::sleep(hold).await;
            relays.heal();
        }
    }
    c.wait_ready(http, &[1, 2, 3], Duration::from_secs(60))
        .await;
}

/// A node joins while appends go on (every group adds, catches up and promotes it), then
/// leaves again (every group removes it) and is stopped.
async fn membership_round(c: &mut Cluster, http: &reqwest::Client) {
    let via = c.url(2, "");
    let said = cluster_cmd(c, &["add-node", "--url", &via, "--id", "4"]);
    assert!(said.contains("node 4 added"), "{said}");
    let child = c.spawn(4);
    c.nodes.push(Some(child));
    wait_groups(c, http, 1, &[1, 2, 3, 4], Duration::from_secs(60)).await;
    let said = cluster_cmd(c, &["remove-node", "--url", &via, "--id", "4"]);
    assert!(said.contains("node 4 removed"), "{said}");
    wait_groups(c, http, 1, &[1, 2, 3], Duration::from_secs(60)).await;
    c.kill(4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_partitions_and_one_way_cuts_lose_no_acknowledged_append() {
    // Proves, on real processes with relayed node links: with appends in flight through all
    // three nodes, SIGKILLs of random nodes and of leaders, a node cut off both ways and one
    // direction of a pair cut, each healed, and a node added and removed, lose no
    // acknowledged append; every node then holds every one at the seq it was acknowledged
    // at, seqs dense, each key once.
    let (http, mut c, token) = ready_demo_cluster(true).await;
    relays_cut_for_real(&c, &http, &token).await;
    let urls: Vec<String> = (1..=3).map(|i| c.url(i, "")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let w = tokio::spawn(writer(
        http.clone(),
        urls,
        token.clone(),
        stop.clone(),
        acked.clone(),
    ));
    let seed = std::process::id() as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Every kind of fault, each twice, in an order the seed shuffles.
    let mut kinds: Vec<u32> = (0..ROUNDS).map(|r| r % FAULT_KINDS).collect();
    rand::seq::SliceRandom::shuffle(kinds.as_mut_slice(), &mut rng);
    for kind in kinds {
        fault_round(&mut c, &http, &mut rng, kind).await;
    }
    membership_round(&mut c, &http).await;
    stop.store(true, Ordering::SeqCst);
    w.await.expect("the writer ends");
    let acked = acked.lock().expect("no panic holding it").clone();
    eprintln!(
        "seed {seed}: {} appends acknowledged over {ROUNDS} fault rounds",
        acked.len()
    );
    assert!(
        acked.len() as u64 >= 4 * WINDOW,
        "seed {seed}: {} acked",
        acked.len()
    );
    for i in 1..=3u16 {
        assert_holds_every_append(&c, &http, &token, i, "local", &acked).await;
    }
}
