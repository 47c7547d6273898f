//! A cluster of real `fabric serve` processes on loopback, as `fabric cluster init` writes
//! it, optionally with every node link through a UDP relay the test switches (partitions,
//! one-way cuts, heals); appends retried with their keys; reads of the whole log.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn fabric() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
    c.env_remove("FABRIC_ADMIN_TOKEN").env("FABRIC_LOG", "warn");
    c
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub base: u16,
    pub nodes: Vec<Option<Child>>,
    pub token: String,
    /// With node links through relays: the test's switches for them.
    pub relays: Option<Relays>,
}

impl Cluster {
    pub fn start(n: u16) -> Cluster {
        Cluster::start_with(n, false)
    }

    /// A cluster of `n` nodes; with `relayed`, every node reaches every other through a UDP
    /// relay of this process ([`Relays`]), so the test can cut any direction of any pair.
    pub fn start_with(n: u16, relayed: bool) -> Cluster {
        Cluster::start_shards(n, relayed, fabric::cluster::init::SHARDS_DEFAULT)
    }

    /// [`Cluster::start_with`], every node with `shards` shards.
    pub fn start_shards(n: u16, relayed: bool, shards: u32) -> Cluster {
        // Each test of this binary probes from its own salt: two clusters starting together
        // must not settle on the same block before either binds it.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("tmp");
        let salt = std::process::id().wrapping_add(k.wrapping_mul(1_009));
        let base =
            fabric::cluster::init::free_base_port(n.into(), salt).expect("a free block of ports");
        let init = fabric()
            .args(["cluster", "init", "--nodes", &n.to_string(), "--base-port"])
            .arg(base.to_string())
            .arg("--dir")
            .arg(dir.path())
            .arg("--shards")
            .arg(shards.to_string())
            .output()
            .expect("init runs");
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let token = std::fs::read_to_string(dir.path().join("admin-token")).expect("token");
        let relays = relayed.then(|| Relays::start(dir.path(), base, n));
        let mut c = Cluster {
            dir,
            base,
            nodes: Vec::new(),
            token: token.trim().to_string(),
            relays,
        };
        for i in 1..=n {
            let child = c.spawn(i);
            c.nodes.push(Some(child));
        }
        c
    }

    pub fn spawn(&self, i: u16) -> Child {
        fabric()
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join(format!("node-{i}.toml")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve starts")
    }

    pub fn url(&self, i: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + 10 * (i - 1))
    }

    /// Node `i`'s metrics port (`cluster init` puts it at +3).
    pub fn metrics_url(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}/metrics", self.base + 10 * (i - 1) + 3)
    }

    pub fn kill(&mut self, i: u16) {
        if let Some(mut c) = self.nodes[i as usize - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: u16) {
        let child = self.spawn(i);
        self.nodes[i as usize - 1] = Some(child);
    }

    pub async fn ready(&self, http: &reqwest::Client, i: u16) -> bool {
        let r = http.get(self.url(i, "/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    }

    pub async fn wait_ready(&self, http: &reqwest::Client, nodes: &[u16], within: Duration) {
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

    pub async fn admin(&self, req: reqwest::RequestBuilder) -> serde_json::Value {
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

/// Appends `n` through node `first` with key `k{n}`, retrying `unavailable` (through the next
/// live node) with the same key until `deadline`; the seq it was acknowledged at.
pub async fn append(c: &Cluster, http: &reqwest::Client, token: &str, first: u16, n: u64) -> u64 {
    let urls: Vec<String> = (1..=c.nodes.len() as u16)
        .filter(|i| c.nodes[*i as usize - 1].is_some())
        .map(|i| c.url(i, ""))
        .collect();
    let at = urls
        .iter()
        .position(|u| *u == c.url(first, ""))
        .unwrap_or(0);
    append_anywhere(http, &urls, token, at, n, Duration::from_secs(30)).await
}

/// Appends `n` with key `k{n}` to conversation `log` of mesh `demo`, starting at `urls[first]`
/// and moving to the next URL on any failure, until acknowledged within `within`: its seq.
pub async fn append_anywhere(
    http: &reqwest::Client,
    urls: &[String],
    token: &str,
    first: usize,
    n: u64,
    within: Duration,
) -> u64 {
    let deadline = Instant::now() + within;
    let mut i = first % urls.len();
    loop {
        assert!(Instant::now() < deadline, "append {n} acknowledged in time");
        let url = format!("{}/v1/meshes/demo/conversations/log/messages", urls[i]);
        let body = serde_json::json!({"body": {"n": n}, "key": format!("k{n}")});
        let r = http.post(url).bearer_auth(token).json(&body).send().await;
        if let Ok(r) = r {
            if r.status() == 201 {
                let v: serde_json::Value = r.json().await.expect("json");
                return v["seq"].as_u64().expect("a seq");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        i = (i + 1) % urls.len();
    }
}

/// An HTTP client, a 3-node cluster (relayed or not) with every node ready, and alice's
/// token in mesh `demo`.
pub async fn ready_demo_cluster(relayed: bool) -> (reqwest::Client, Cluster, String) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let c = Cluster::start_with(3, relayed);
    c.wait_ready(&http, &[1, 2, 3], Duration::from_secs(30))
        .await;
    let token = demo_peer(&c, &http).await;
    (http, c, token)
}

/// Mesh `demo` with peer `alice`, made through nodes 1 and 2: alice's token.
pub async fn demo_peer(c: &Cluster, http: &reqwest::Client) -> String {
    c.admin(http.post(c.url(1, "/v1/meshes")).body("{\"id\":\"demo\"}"))
        .await;
    let peer = c
        .admin(
            http.post(c.url(2, "/v1/meshes/demo/peers"))
                .body("{\"id\":\"alice\"}"),
        )
        .await;
    peer["token"].as_str().expect("a peer token").to_string()
}

/// Node `i` reads (with `consistency`; a `local` read is retried for up to 30 s while the
/// replica catches up) conversation `log` whole: dense seqs, every acknowledged append `n` at
/// the seq it was acknowledged at, each key once.
pub async fn assert_holds_every_append(
    c: &Cluster,
    http: &reqwest::Client,
    token: &str,
    i: u16,
    consistency: &str,
    acked: &std::collections::BTreeMap<u64, u64>,
) {
    let last = acked.values().max().copied().unwrap_or(0) as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = read_all(c, http, token, i, consistency).await;
    while consistency == "local" && log.len() < last && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = read_all(c, http, token, i, consistency).await;
    }
    let seqs: Vec<u64> = log.iter().map(|(s, _)| *s).collect();
    let dense: Vec<u64> = (1..=log.len() as u64).collect();
    assert_eq!(seqs, dense, "node {i} ({consistency}): dense seqs");
    for (n, seq) in acked {
        let at = log.get(*seq as usize - 1).map(|e| e.1);
        assert_eq!(
            at,
            Some(*n),
            "node {i} ({consistency}): append {n} at seq {seq}"
        );
    }
    let keys: std::collections::BTreeSet<u64> = log.iter().map(|e| e.1).collect();
    assert_eq!(keys.len(), log.len(), "node {i}: each key appended once");
}

/// Every message of the conversation, read through node `i`: (seq, n).
pub async fn read_all(
    c: &Cluster,
    http: &reqwest::Client,
    token: &str,
    i: u16,
    consistency: &str,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    // Pages of at most READ_PAGE_MAX, each from just past the last; a bounded number of them.
    for _ in 0..READ_PAGES_MAX {
        let from = out.last().map_or(1, |e| e.0 + 1);
        let path = format!(
            "/v1/meshes/demo/conversations/log/messages?from={from}&limit={READ_PAGE_MAX}\
             &consistency={consistency}"
        );
        let r = http
            .get(c.url(i, &path))
            .bearer_auth(token)
            .send()
            .await
            .expect("read");
        assert_eq!(r.status(), 200, "node {i}: a {consistency} read");
        let v: serde_json::Value = r.json().await.expect("json");
        let messages = v["messages"].as_array().cloned().unwrap_or_default();
        let page: Vec<(u64, u64)> = messages
            .iter()
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap_or(0),
                    m["body"]["n"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let full = page.len() == READ_PAGE_MAX;
        out.extend(page);
        if !full {
            return out;
        }
    }
    panic!("node {i}: the log is longer than {READ_PAGES_MAX} pages");
}

/// Node `via`'s view of every group's voters (data shards, then the metadata group).
pub async fn groups(c: &Cluster, http: &reqwest::Client, via: u16) -> Vec<Vec<u64>> {
    let v = c.admin(http.get(c.url(via, "/v1/cluster"))).await;
    let members = |g: &serde_json::Value| -> Vec<u64> {
        g["members"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m.as_u64()).collect())
            .unwrap_or_default()
    };
    let mut out: Vec<Vec<u64>> = v["shards"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(members)
        .collect();
    out.push(members(&v["meta"]));
    out
}

/// Waits (at most `within`) until node `via` sees every group with exactly `voters`.
pub async fn wait_groups(
    c: &Cluster,
    http: &reqwest::Client,
    via: u16,
    voters: &[u64],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let g = groups(c, http, via).await;
        if g.iter().all(|m| m == voters) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "every group's voters {voters:?} within {within:?}; node {via} sees {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn cluster_cmd(c: &Cluster, args: &[&str]) -> String {
    let out = fabric()
        .arg("cluster")
        .args(args)
        .arg("--dir")
        .arg(c.dir.path())
        .output()
        .expect("the command runs");
    assert!(
        out.status.success(),
        "fabric cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages one read asks for.
const READ_PAGE_MAX: usize = 1000;
/// Pages `read_all` reads at most.
const READ_PAGES_MAX: usize = 100;

/// UDP relays for every ordered pair of nodes: node `i` reaches node `j`'s link through relay
/// `(i, j)` (its config names the relay's port as `j`'s link address), and `blocked(a, b)`
/// drops every packet from `a` to `b`, on whichever relay carries it (a QUIC connection runs
/// both ways over the relay of the node that dialed).
pub struct Relays {
    n: u16,
    /// `cut[(a - 1) * n + (b - 1)]`: packets from a to b are dropped.
    cut: Arc<Vec<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Largest datagram a relay forwards (QUIC's are at most about 1,500 bytes here).
const RELAY_DATAGRAM_BYTES_MAX: usize = 65_536;

impl Relays {
    /// Binds a relay per ordered pair and rewrites each `node-i.toml` to reach the others
    /// through them.
    fn start(dir: &std::path::Path, base: u16, n: u16) -> Relays {
        let cut: Arc<Vec<AtomicBool>> =
            Arc::new((0..n * n).map(|_| AtomicBool::new(false)).collect());
        let link = |j: u16| std::net::SocketAddr::from(([127, 0, 0, 1], base + 10 * (j - 1) + 2));
        let mut tasks = Vec::new();
        for i in 1..=n {
            let path = dir.join(format!("node-{i}.toml"));
            let mut toml = std::fs::read_to_string(&path).expect("node config");
            for j in (1..=n).filter(|j| *j != i) {
                let front = std::net::UdpSocket::bind("127.0.0.1:0").expect("relay port");
                let port = front.local_addr().expect("addr").port();
                let real = format!("\nlink = \"{}\"", link(j));
                let relayed = format!("\nlink = \"127.0.0.1:{port}\"");
                assert!(toml.contains(&real), "node-{i}.toml names node {j}'s link");
                toml = toml.replace(&real, &relayed);
                front.set_nonblocking(true).expect("nonblocking");
                let cut = cut.clone();
                tasks.push(tokio::spawn(relay(front, link(j), cut, n, i, j)));
            }
            std::fs::write(&path, toml).expect("rewrite config");
        }
        Relays { n, cut, tasks }
    }

    fn at(&self, from: u16, to: u16) -> &AtomicBool {
        &self.cut[usize::from((from - 1) * self.n + (to - 1))]
    }

    /// Drops (or passes again) every packet from `from` to `to`.
    pub fn set(&self, from: u16, to: u16, blocked: bool) {
        self.at(from, to).store(blocked, Ordering::SeqCst);
    }

    /// Node `i` cut off from every other, both ways.
    pub fn isolate(&self, i: u16) {
        for j in (1..=self.n).filter(|j| *j != i) {
            self.set(i, j, true);
            self.set(j, i, true);
        }
    }

    pub fn heal(&self) {
        for c in self.cut.iter() {
            c.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Relay `(i, j)`: datagrams from node `i` (whoever sent the last one to `front`) go to `j`'s
/// link from a socket of its own; `j`'s answers go back to `i`. Each direction obeys its cut.
async fn relay(
    front: std::net::UdpSocket,
    to: std::net::SocketAddr,
    cut: Arc<Vec<AtomicBool>>,
    n: u16,
    i: u16,
    j: u16,
) {
    let front = tokio::net::UdpSocket::from_std(front).expect("tokio socket");
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("relay back");
    let blocked = |a: u16, b: u16| cut[usize::from((a - 1) * n + (b - 1))].load(Ordering::SeqCst);
    let mut client: Option<std::net::SocketAddr> = None;
    let (mut up, mut down) = (
        vec![0u8; RELAY_DATAGRAM_BYTES_MAX],
        vec![0u8; RELAY_DATAGRAM_BYTES_MAX],
    );
    loop {
        tokio::select! {
            r = front.recv_from(&mut up) => {
                let Ok((len, from)) = r else { continue };
                client = Some(from);
                if !blocked(i, j) {
                    let _ = back.send_to(&up[..len], to).await;
                }
            }
            r = back.recv_from(&mut down) => {
                let Ok((len, _)) = r else { continue };
                if let (Some(c), false) = (client, blocked(j, i)) {
                    let _ = front.send_to(&down[..len], c).await;
                }
            }
        }
    }
}
