//! ed25519 peer identities over a real node: keys registered over HTTP, key hellos with the
//! Rust client and over raw frames, replays and wrong keys refused, the node serving on.

mod common;

use common::{base, create_mesh, http, start, Peer};
use fabric::client::{Admin, Client, ClientConfig, ClientError, Incoming};
use fabric::identity::Identity;
use fabric_proto::ErrorCode;
use serde_json::{json, Value};

/// Registers `peer` in mesh `m` with `key` (no token), checking the answer.
async fn add_key_peer(base: &str, peer: &str, key: &Identity) {
    let r = http()
        .post(format!("{base}/v1/meshes/m/peers"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": peer, "public_key": key.public_key_hex()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["public_key"], key.public_key_hex());
    assert!(v.get("token").is_none(), "no token unless asked: {v}");
}

fn ws_url(node: &fabric::node::RunningNode) -> String {
    format!("ws://{}/v1/ws", node.addr())
}

/// A raw key hello: challenge, sign with `key`, hello. Returns the peer, the nonce and the
/// hello frame sent.
async fn raw_key_hello(
    addr: std::net::SocketAddr,
    peer: &str,
    key: &Identity,
) -> (Peer, [u8; 32], Value) {
    let mut p = Peer::connect(addr).await;
    p.send(json!({"op": "challenge"})).await;
    let c = p.recv().await;
    assert_eq!(c["op"], "challenge", "{c}");
    let nonce: [u8; 32] = hex::decode(c["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let ts = fabric::now_ms();
    let sig = key.sign_hello("m", peer, ts, &nonce);
    let hello = json!({"op":"hello","mesh":"m","peer":peer,"sig":hex::encode(sig),"ts":ts});
    p.send(hello.clone()).await;
    (p, nonce, hello)
}

#[tokio::test]
async fn a_peer_registered_with_a_key_connects_with_the_rust_client_and_gets_messages() {
    // Proves key registration over HTTP, a key hello by fabric::client, and delivery to it.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let admin = Admin::new(&base, "admin-secret");
    let alice_token = admin.add_peer("m", "alice", &[]).await.unwrap();
    let key = Identity::generate().unwrap();
    add_key_peer(&base, "bob", &key).await;

    let bob = Client::connect(ClientConfig::new(&ws_url(&node), "m", "bob", "").with_key(key))
        .await
        .expect("key hello welcomed");
    let alice = Client::connect(ClientConfig::new(
        &ws_url(&node),
        "m",
        "alice",
        &alice_token,
    ))
    .await
    .unwrap();
    let pos = alice.send("bob", &json!({"text": "hi bob"})).await.unwrap();
    match tokio::time::timeout(common::WAIT, bob.next_delivery()).await {
        Ok(Some(Incoming::Deliver { pos: p, from, .. })) => {
            assert_eq!((p, &*from), (pos, "alice"));
        }
        other => panic!("{other:?}"),
    }
    // And bob can send too, as the peer its key proved.
    bob.send("alice", &json!("hi alice")).await.unwrap();
    match tokio::time::timeout(common::WAIT, alice.next_delivery()).await {
        Ok(Some(Incoming::Deliver { from, .. })) => assert_eq!(&*from, "bob"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_replayed_hello_on_a_new_socket_is_refused_and_the_node_serves_on() {
    // Proves a signed hello captured from one session cannot authenticate another (its nonce
    // differs), and a second hello on the first session is refused too.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let key = Identity::generate().unwrap();
    add_key_peer(&base, "bob", &key).await;

    let (mut first, _, hello) = raw_key_hello(node.addr(), "bob", &key).await;
    assert_eq!(first.recv().await["op"], "welcome");
    first.send(hello.clone()).await;
    let again = first.recv().await;
    assert_eq!(again["code"], "unauthorized", "{again}");

    // The same bytes on a new socket: once after asking for that socket's challenge, once
    // without asking.
    let mut replay = Peer::connect(node.addr()).await;
    replay.send(json!({"op": "challenge"})).await;
    assert_eq!(replay.recv().await["op"], "challenge");
    replay.send(hello.clone()).await;
    let refused = replay.recv().await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("bad signature"),
        "{refused}"
    );
    assert!(replay.try_recv().await.is_none(), "the session is closed");

    let mut blind = Peer::connect(node.addr()).await;
    blind.send(hello).await;
    let refused = blind.recv().await;
    assert_eq!(refused["code"], "unauthorized");
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("no challenge"));

    // The node keeps serving: a fresh key hello works.
    let (mut fresh, _, _) = raw_key_hello(node.addr(), "bob", &key).await;
    assert_eq!(fresh.recv().await["op"], "welcome");
}

#[tokio::test]
async fn a_wrong_key_or_a_stale_ts_is_refused_and_the_node_serves_on() {
    // Proves a hello signed by another key, and one whose ts is beyond hello_skew_ms_max, are
    // unauthorized errors for the Rust client and the node goes on serving.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let key = Identity::generate().unwrap();
    add_key_peer(&base, "bob", &key).await;

    let wrong = Identity::generate().unwrap();
    let err = Client::connect(ClientConfig::new(&ws_url(&node), "m", "bob", "").with_key(wrong))
        .await
        .expect_err("wrong key refused");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert!(matches!(err, ClientError::Server { .. }));

    // A token hello for a key-only peer fails as well.
    let err = Client::connect(ClientConfig::new(&ws_url(&node), "m", "bob", "guess"))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));

    let mut stale = Peer::connect(node.addr()).await;
    stale.send(json!({"op": "challenge"})).await;
    let c = stale.recv().await;
    let nonce: [u8; 32] = hex::decode(c["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let ts = fabric::now_ms() - fabric::identity::HELLO_SKEW_MS_MAX - 5_000;
    let sig = key.sign_hello("m", "bob", ts, &nonce);
    stale
        .send(json!({"op":"hello","mesh":"m","peer":"bob","sig":hex::encode(sig),"ts":ts}))
        .await;
    let refused = stale.recv().await;
    assert_eq!(refused["code"], "unauthorized");
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("hello_skew_ms_max"));

    Client::connect(ClientConfig::new(&ws_url(&node), "m", "bob", "").with_key(key))
        .await
        .expect("the right key still works");
}

#[tokio::test]
async fn a_peer_with_both_a_key_and_a_token_may_use_either_and_keys_survive_a_restart() {
    // Proves `"token": true` beside a key returns a token that works, the key works too, and
    // the key is still known after the node restarts from its WAL.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let key = Identity::generate().unwrap();
    let admin = Admin::new(&base, "admin-secret");
    let token = admin
        .add_peer_with_key("m", "bob", &["ops"], &key.public_key_hex(), true)
        .await
        .unwrap()
        .expect("a token was asked for");
    Peer::hello(node.addr(), "m", "bob", &token).await;
    let (mut p, _, _) = raw_key_hello(node.addr(), "bob", &key).await;
    assert_eq!(p.recv().await["op"], "welcome");
    let bad = admin
        .add_peer_with_key("m", "carol", &[], "not-hex", false)
        .await
        .expect_err("bad key text");
    assert_eq!(bad.code(), Some(ErrorCode::BadRequest));
    drop(p);
    node.shutdown().await;

    let node = start(dir.path()).await;
    Client::connect(ClientConfig::new(&ws_url(&node), "m", "bob", "").with_key(key))
        .await
        .expect("the key was recovered from the WAL");
}

#[tokio::test]
async fn a_key_hello_works_over_quic_too() {
    // Proves the challenge and signed hello run over the QUIC transport (the same session
    // core), and a wrong key is refused there as well.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let key = Identity::generate().unwrap();
    add_key_peer(&base, "bob", &key).await;
    let url = format!(
        "quic://{}",
        node.quic_addr().expect("QUIC is on by default")
    );
    let pin = node.tls_fingerprint().expect("a certificate");

    let wrong = ClientConfig::new(&url, "m", "bob", "")
        .with_pin(pin)
        .with_key(Identity::generate().unwrap());
    let err = Client::connect(wrong).await.expect_err("wrong key refused");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");

    let bob = Client::connect(
        ClientConfig::new(&url, "m", "bob", "")
            .with_pin(pin)
            .with_key(key),
    )
    .await
    .expect("key hello over QUIC");
    let seq = bob.append("c", &json!("over quic"), None).await.unwrap();
    assert_eq!(seq, 1);
}
