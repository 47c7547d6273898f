//! Shared helpers for the node's integration tests: a node on a free loopback port with a temp
//! data dir, admin calls, and a raw WebSocket peer speaking JSON frames.
#![allow(dead_code)]

pub mod cluster;

use fabric::config::Config;
use fabric::node::RunningNode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(10);

pub fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        partitions: 16,
        admin_token: Some("admin-secret".into()),
        ..Config::default()
    }
}

/// One shard and one partition: tests that look at segment files know where data lands.
pub fn one_shard_config(dir: &std::path::Path) -> Config {
    Config {
        shards: 1,
        partitions: 1,
        ..config(dir)
    }
}

/// Creates mesh `m` with peer `a` and returns a's token.
pub async fn mesh_with_peer(base: &str) -> String {
    create_mesh(base, "m").await;
    add_peer(base, "m", "a", &[]).await
}

pub async fn start(dir: &std::path::Path) -> RunningNode {
    fabric::node::start(config(dir)).await.expect("node starts")
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn create_mesh(base: &str, mesh: &str) {
    let r = http()
        .post(format!("{base}/v1/meshes"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": mesh}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

pub async fn add_peer(base: &str, mesh: &str, peer: &str, groups: &[&str]) -> String {
    let r = http()
        .post(format!("{base}/v1/meshes/{mesh}/peers"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": peer, "groups": groups}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

pub fn base(node: &RunningNode) -> String {
    format!("http://{}", node.addr())
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Peer {
    pub ws: Ws,
}

impl Peer {
    pub async fn connect(addr: std::net::SocketAddr) -> Peer {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
            .await
            .expect("websocket connects");
        Peer { ws }
    }

    pub async fn hello(
        addr: std::net::SocketAddr,
        mesh: &str,
        peer: &str,
        token: &str,
    ) -> (Peer, Value) {
        let mut p = Peer::connect(addr).await;
        p.send(json!({"op":"hello","mesh":mesh,"peer":peer,"token":token}))
            .await;
        let w = p.recv().await;
        assert_eq!(w["op"], "welcome", "{w}");
        (p, w)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Message::Text(s.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON frame (fails the test after WAIT).
    pub async fn recv(&mut self) -> Value {
        self.try_recv().await.expect("a frame")
    }

    /// The next JSON frame, or None if the server closed the connection.
    pub async fn try_recv(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frame within WAIT");
            match m {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Binary(_))) => panic!("unexpected binary frame"),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Collects frames until `pred` has matched `n` of them.
    pub async fn collect(&mut self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut got = Vec::new();
        while got.len() < n {
            let v = self.recv().await;
            if pred(&v) {
                got.push(v);
            }
        }
        got
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most 20 s) until `GET /readyz` answers 200.
pub async fn wait_ready(base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http().get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node's `/metrics` text.
pub async fn metrics_text(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One replay page of a conversation over HTTP: `{"messages":[…],"head":N}`.
pub async fn read_conv(base: &str, token: &str, mesh: &str, conv: &str, query: &str) -> Value {
    http()
        .get(format!(
            "{base}/v1/meshes/{mesh}/conversations/{conv}/messages?{query}"
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
