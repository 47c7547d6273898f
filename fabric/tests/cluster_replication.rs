//! A replicated cluster of real `fabric serve` processes on loopback, as `fabric cluster
//! init` writes it: any node takes writes, every acknowledged append survives the SIGKILL of a
//! shard's leader, and a killed node rejoins.

use fabric::client::{Client, ClientConfig, Incoming};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fabric() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
    c.env_remove("FABRIC_ADMIN_TOKEN").env("FABRIC_LOG", "warn");
    c
}

struct Cluster {
    dir: tempfile::TempDir,
    base: u16,
    nodes: Vec<Option<Child>>,
    token: String,
}

impl Cluster {
    fn start(n: u16) -> Cluster {
        let dir = tempfile::tempdir().expect("tmp");
        let base = fabric::cluster::init::free_base_port(n.into(), std::process::id())
            .expect("a free block of ports");
        let init = fabric()
            .args(["cluster", "init", "--nodes", &n.to_string(), "--base-port"])
            .arg(base.to_string())
            .arg("--dir")
            .arg(dir.path())
            .output()
            .expect("init runs");
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let token = std::fs::read_to_string(dir.path().join("admin-token")).expect("token");
        let mut c = Cluster {
            dir,
            base,
            nodes: Vec::new(),
            token: token.trim().to_string(),
        };
        for i in 1..=n {
            let child = c.spawn(i);
            c.nodes.push(Some(child));
        }
        c
    }

    fn spawn(&self, i: u16) -> Child {
        fabric()
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join(format!("node-{i}.toml")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve starts")
    }

    fn url(&self, i: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + 10 * (i - 1))
    }

    fn kill(&mut self, i: u16) {
        if let Some(mut c) = self.nodes[i as usize - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self, i: u16) {
        let child = self.spawn(i);
        self.nodes[i as usize - 1] = Some(child);
    }

    async fn ready(&self, http: &reqwest::Client, i: u16) -> bool {
        let r = http.get(self.url(i, "/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    }

    async fn wait_ready(&self, http: &reqwest::Client, nodes: &[u16], within: Duration) {
        let deadline = Instant::now() + within;
        for i in nodes {
            while !self.ready(http, *i).await {
                assert!(
                    Instant::now() < deadline,
                    "nodes {nodes:?} ready within {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn admin(&self, req: reqwest::RequestBuilder) -> serde_json::Value {
        let r = req
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("admin call");
        r.json().await.expect("json")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.nodes.len() as u16 {
            self.kill(i);
        }
    }
}

/// Appends `n` through node `i` with key `k{n}`, retrying `unavailable` (through the next
/// node) with the same key until `deadline`; the seq it was acknowledged at.
async fn append(c: &Cluster, http: &reqwest::Client, token: &str, first: u16, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let nodes = c.nodes.len() as u16;
    let mut i = first;
    loop {
        assert!(Instant::now() < deadline, "append {n} acknowledged in time");
        while c.nodes[i as usize - 1].is_none() {
            i = i % nodes + 1;
        }
        let url = c.url(i, "/v1/meshes/demo/conversations/log/messages");
        let body = serde_json::json!({"body": {"n": n}, "key": format!("k{n}")});
        let r = http.post(url).bearer_auth(token).json(&body).send().await;
        if let Ok(r) = r {
            if r.status() == 201 {
                let v: serde_json::Value = r.json().await.expect("json");
                return v["seq"].as_u64().expect("a seq");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        i = i % nodes + 1;
    }
}

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

/// Every message of the conversation, read through node `i`: (seq, n).
async fn read_all(c: &Cluster, http: &reqwest::Client, token: &str, i: u16) -> Vec<(u64, u64)> {
    let url = c.url(
        i,
        "/v1/meshes/demo/conversations/log/messages?from=1&limit=1000",
    );
    let r = http.get(url).bearer_auth(token).send().await.expect("read");
    let v: serde_json::Value = r.json().await.expect("json");
    let messages = v["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap_or(0),
                m["body"]["n"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_every_acknowledged_append_through_a_leader_kill() {
    // Proves, on real processes and real QUIC node links with mutual TLS: appends through any
    // node are acknowledged once a quorum holds them; SIGKILL of a shard's leader loses none of
    // them, a new leader takes writes (clients retry with their keys), the killed node rejoins,
    // and every node then reads the same dense log holding every acknowledged append once.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut c = Cluster::start(3);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(30))
        .await;
    c.admin(http.post(c.url(1, "/v1/meshes")).body("{\"id\":\"demo\"}"))
        .await;
    let peer = c
        .admin(
            http.post(c.url(2, "/v1/meshes/demo/peers"))
                .body("{\"id\":\"alice\"}"),
        )
        .await;
    let token = peer["token"].as_str().expect("a peer token").to_string();
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
    for i in 1..=3u16 {
        let log = read_all(&c, &http, &token, i).await;
        let seqs: Vec<u64> = log.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=log.len() as u64).collect::<Vec<_>>(),
            "node {i}: dense seqs"
        );
        for (n, seq) in &acked {
            let at = log.get(*seq as usize - 1).map(|e| e.1);
            assert_eq!(at, Some(*n), "node {i}: append {n} at seq {seq}");
        }
        let bodies: std::collections::BTreeSet<u64> = log.iter().map(|e| e.1).collect();
        assert_eq!(bodies.len(), log.len(), "node {i}: each key appended once");
    }
}
