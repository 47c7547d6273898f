//! Hostile and broken clients against a real node, over WebSocket and QUIC: the pre-auth
//! nested-batch frame, bodies that are not UTF-8 JSON, the largest body against a client with
//! a 1 MiB frame limit, clients that stop reading or answering pings, too many frames before
//! hello, invalid UTF-8 text frames (1007), a QUIC subscription stream nobody reads. After each,
//! the node serves on.

mod common;
use common::*;
use fabric::config::Config;
use fabric::node::RunningNode;
use fabric::tls::Trust;
use fabric_proto::{codec, ClientOp, ServerOp, Target};
use fabric_proto::{ConvId, MeshId, PeerId};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

async fn start_with(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> RunningNode {
    let mut c = config(dir);
    tweak(&mut c);
    fabric::node::start(c).await.expect("node starts")
}

/// Waits (at most WAIT) until the node has `n` sessions open.
async fn sessions_open(node: &RunningNode, n: u64) {
    let deadline = Instant::now() + WAIT;
    while node.ctx().sessions_open.load(Ordering::Relaxed) != n {
        assert!(
            Instant::now() < deadline,
            "{} sessions open, expected {n}",
            node.ctx().sessions_open.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next binary frame's ops.
async fn recv_binary(ws: &mut Ws) -> Vec<ServerOp> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame")
        {
            Some(Ok(Message::Binary(b))) => return codec::decode_server_binary(&b).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

/// The pre-auth crash of issue 12: `[7,1]` x 6000 then `[6,1]` (12 KB).
fn nested_batches() -> Vec<u8> {
    let mut f = [7u8, 1].repeat(6000);
    f.extend_from_slice(&[6, 1]);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nested_batch_frame_before_hello_leaves_the_node_serving() {
    // Proves the 12 KB frame of 6,000 nested Batch tags, sent before hello on WebSocket and on
    // QUIC, is answered bad_request (it overflowed the stack and aborted the process), and the
    // node goes on serving that session and others.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let token = mesh_with_peer(&b).await;
    let mut p = Peer::connect(node.addr()).await;
    p.ws.send(Message::Binary(nested_batches().into()))
        .await
        .unwrap();
    match &recv_binary(&mut p.ws).await[..] {
        [ServerOp::Error { code, message, .. }] => {
            assert_eq!(*code, fabric_proto::ErrorCode::BadRequest);
            assert!(message.contains("nest"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let hello = ClientOp::Hello {
        mesh: MeshId::must("m"),
        peer: PeerId::must("a"),
        token: token.clone(),
    };
    p.ws.send(Message::Binary(codec::encode_client_binary(&hello).into()))
        .await
        .unwrap();
    assert!(matches!(
        recv_binary(&mut p.ws).await[..],
        [ServerOp::Welcome { .. }]
    ));

    let conn = quic_raw(&node).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = fabric::quic::FrameReader::new(recv, 1 << 20);
    send.write_all(&fabric::quic::frame(&nested_batches()))
        .await
        .unwrap();
    match &quic_ops(&mut recv).await[..] {
        [ServerOp::Error { code, .. }] => assert_eq!(*code, fabric_proto::ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    let (mut other, _) = Peer::hello(node.addr(), "m", "a", &token).await;
    other.send(json!({"op":"ping","ref":1})).await;
    assert_eq!(other.recv().await["op"], "pong");
    node.shutdown().await;
}

async fn quic_raw(node: &RunningNode) -> quinn::Connection {
    let cfg = fabric::quic::client_config(
        &Trust::Pin(node.tls_fingerprint().unwrap()),
        fabric::tls::ALPN,
    )
    .unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep.connect(node.quic_addr().unwrap(), "localhost").unwrap();
    tokio::time::timeout(WAIT, conn).await.unwrap().unwrap()
}

async fn quic_ops(recv: &mut fabric::quic::FrameReader) -> Vec<ServerOp> {
    match tokio::time::timeout(WAIT, recv.next()).await.unwrap() {
        Ok(Some(fabric::quic::ReadFrame::Frame(b))) => codec::decode_server_binary(&b).unwrap(),
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn quic_write(send: &mut quinn::SendStream, op: &ClientOp) {
    send.write_all(&fabric::quic::frame(&codec::encode_client_binary(op)))
        .await
        .unwrap();
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_utf8_is_refused_and_json_recipients_miss_nothing() {
    // Proves a binary send whose body is a quoted 0xff byte (acknowledged before, then skipped
    // by JSON sessions) is refused as bad_request; the JSON recipient gets every acknowledged
    // message in order with no gap, and the HTTP page stays valid JSON.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let tb = add_peer(&b, "m", "b", &[]).await;
    let (mut bob, _) = Peer::hello(node.addr(), "m", "b", &tb).await;
    let mut a = Peer::connect(node.addr()).await;
    let hello = ClientOp::Hello {
        mesh: MeshId::must("m"),
        peer: PeerId::must("a"),
        token: ta.clone(),
    };
    let send = |r: u64, body: &'static [u8]| ClientOp::Send {
        r,
        to: Target::Peer(PeerId::must("b")),
        body: fabric_proto::Body::from_trusted(bytes::Bytes::from_static(body)),
        key: None,
    };
    let append = |r: u64, body: &'static [u8]| ClientOp::Append {
        r,
        conv: ConvId::must("c"),
        body: fabric_proto::Body::from_trusted(bytes::Bytes::from_static(body)),
        key: None,
    };
    for op in [
        &hello,
        &send(1, b"1"),
        &send(2, b"\"\xff\""),
        &send(3, b"3"),
        &append(4, b"[\"\xc3\"]"),
        &append(5, b"5"),
    ] {
        a.ws.send(Message::Binary(codec::encode_client_binary(op).into()))
            .await
            .unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 6 {
        answers.extend(recv_binary(&mut a.ws).await);
    }
    let refused = answers
        .iter()
        .filter(|op| {
            matches!(op, ServerOp::Error { r: None, code, .. }
                if *code == fabric_proto::ErrorCode::BadRequest)
        })
        .count();
    let acked: Vec<u64> = answers
        .iter()
        .filter_map(|op| match op {
            ServerOp::Ok { pos: Some(p), .. } => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!((refused, acked), (2, vec![1, 2]), "{answers:?}");
    let got = bob.collect(2, |v| v["op"] == "deliver").await;
    assert_eq!(
        (got[0]["pos"].clone(), got[0]["body"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        (got[1]["pos"].clone(), got[1]["body"].clone()),
        (json!(2), json!(3))
    );
    let page = http()
        .get(format!("{b}/v1/meshes/m/conversations/c/messages"))
        .bearer_auth(&ta)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let page: Value = serde_json::from_slice(&page).expect("the HTTP page is valid JSON");
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    node.shutdown().await;
}

/// A WebSocket client that takes frames of at most 1 MiB, as most libraries do by default.
async fn client_with_1_mib_limit(node: &RunningNode) -> Ws {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let url = format!("ws://{}/v1/ws", node.addr());
    tokio_tungstenite::connect_async_with_config(url, Some(cfg), true)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_body_bytes_max_reaches_a_client_with_a_1_mib_frame_limit() {
    // Proves body_bytes_max (frame_bytes_max - 1 KiB = 1,047,552 bytes): a send and an append
    // of exactly that size are accepted and their deliver and event frames reach a client whose
    // frame limit is 1 MiB (the deliver frame of a 1 MiB body did not); one byte more is
    // too_large with the request's ref; over HTTP too (413).
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let tb = add_peer(&b, "m", "b", &[]).await;
    assert_eq!(node.ctx().config.body_bytes_max(), 1_047_552);
    let body = |n: usize| format!("\"{}\"", "x".repeat(n - 2));
    let mut bob = Peer {
        ws: client_with_1_mib_limit(&node).await,
    };
    bob.send(json!({"op":"hello","mesh":"m","peer":"b","token":tb}))
        .await;
    assert_eq!(bob.recv().await["op"], "welcome");
    bob.send(json!({"op":"subscribe","ref":1,"conv":"big"}))
        .await;
    assert_eq!(bob.recv().await["ref"], 1);
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    let max = body(1_047_552);
    a.send_text(&format!(r#"{{"op":"send","ref":1,"to":"b","body":{max}}}"#))
        .await;
    assert_eq!(a.recv().await["pos"], 1);
    a.send_text(&format!(
        r#"{{"op":"append","ref":2,"conv":"big","body":{max}}}"#
    ))
    .await;
    assert_eq!(a.recv().await["seq"], 1);
    let got = bob
        .collect(2, |v| v["op"] == "deliver" || v["op"] == "event")
        .await;
    for v in &got {
        assert_eq!(v["body"].as_str().unwrap().len(), 1_047_550);
    }
    let over = body(1_047_553);
    a.send_text(&format!(
        r#"{{"op":"send","ref":3,"to":"b","body":{over}}}"#
    ))
    .await;
    let e = a.recv().await;
    assert_eq!(
        (e["code"].clone(), e["ref"].clone()),
        (json!("too_large"), json!(3))
    );
    let r = http()
        .post(format!("{b}/v1/meshes/m/conversations/big/messages"))
        .bearer_auth(&ta)
        .body(format!(r#"{{"body":{over}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    bob.send(json!({"op":"ping","ref":9})).await;
    assert_eq!(bob.recv().await["op"], "pong", "bob's connection is fine");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_frames_never_exceed_the_frame_limit() {
    // Proves a client that asked for batch frames gets every frame within 1 MiB while events
    // of 300 KB pile up (a batch closes before it would pass frame_bytes_max).
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let mut bob = Peer {
        ws: client_with_1_mib_limit(&node).await,
    };
    bob.send_text(&format!(
        r#"[{{"op":"options","ref":0,"batch":256}},{{"op":"hello","mesh":"m","peer":"a","token":"{ta}"}}]"#
    ))
    .await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    let body = format!("\"{}\"", "y".repeat(300_000));
    for r in 0..12 {
        a.send_text(&format!(
            r#"{{"op":"append","ref":{r},"conv":"c","body":{body}}}"#
        ))
        .await;
    }
    for _ in 0..12 {
        a.recv().await;
    }
    bob.send(json!({"op":"subscribe","ref":1,"conv":"c"})).await;
    let mut events = 0;
    while events < 12 {
        let m = tokio::time::timeout(WAIT, bob.ws.next()).await.unwrap();
        let Some(Ok(Message::Text(t))) = m else {
            panic!("{m:?}")
        };
        assert!(t.len() <= 1 << 20);
        let v: Value = serde_json::from_str(&t).unwrap();
        let ops = v.as_array().cloned().unwrap_or_else(|| vec![v]);
        events += ops.iter().filter(|o| o["op"] == "event").count();
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_stops_reading_is_closed_after_write_timeout_ms() {
    // Proves a client that subscribes to 40 MB of events and never reads is closed once the
    // node's writes make no progress for write_timeout_ms (it used to be held forever), and
    // the node serves on.
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(dir.path(), |c| c.write_timeout_ms = 500).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let body = format!("\"{}\"", "z".repeat(1_000_000));
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    for r in 0..40 {
        a.send_text(&format!(
            r#"{{"op":"append","ref":{r},"conv":"c","body":{body}}}"#
        ))
        .await;
        a.recv().await;
    }
    let (mut silent, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    silent
        .send(json!({"op":"subscribe","ref":1,"conv":"c"}))
        .await;
    sessions_open(&node, 1).await;
    a.send(json!({"op":"ping","ref":99})).await;
    assert_eq!(a.recv().await["op"], "pong");
    drop(silent);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed_and_a_live_idle_one_is_not() {
    // Proves the dead-peer timeout: with pings every 200 ms and pongs due within 300 ms, a
    // client that never reads (so never answers) is closed, while an idle client whose library
    // answers pings stays open through 10+ pings and still works.
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(dir.path(), |c| {
        c.ping_interval_ms = 200;
        c.pong_timeout_ms = 300;
    })
    .await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let (live, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    let (_deaf, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    sessions_open(&node, 2).await;
    // The live one reads (tungstenite answers pings while reading); the deaf one never does.
    let reader = tokio::spawn(async move {
        let mut live = live;
        let mut pings = 0;
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            if let Ok(Some(Ok(Message::Ping(_)))) =
                tokio::time::timeout(Duration::from_millis(100), live.ws.next()).await
            {
                pings += 1;
            }
        }
        (live, pings)
    });
    let (mut live, pings) = reader.await.unwrap();
    assert!(pings >= 10, "{pings} pings in 2.5 s");
    sessions_open(&node, 1).await;
    live.send(json!({"op":"ping","ref":1})).await;
    assert_eq!(live.recv().await, json!({"op":"pong","ref":1}));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_answered_only_so_much() {
    // Proves the pre-hello limits on a real socket: 16 frames are answered, the 17th closes the
    // connection with unauthorized, and 1024 options in one frame get at most 64 answers.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let mut p = Peer::connect(node.addr()).await;
    for _ in 0..17 {
        p.send(json!({"op":"challenge"})).await;
    }
    let mut frames = Vec::new();
    while let Some(v) = p.try_recv().await {
        frames.push(v);
    }
    assert_eq!(frames.len(), 17, "{frames:?}");
    assert!(frames[..16].iter().all(|v| v["op"] == "challenge"));
    assert_eq!(frames[16]["code"], "unauthorized");
    let mut p = Peer::connect(node.addr()).await;
    let batch: Vec<Value> = (0..1024)
        .map(|r| json!({"op":"options","ref":r,"batch":1}))
        .collect();
    p.send(Value::Array(batch)).await;
    let mut n = 0;
    while p.try_recv().await.is_some() {
        n += 1;
    }
    assert_eq!(n, 66, "64 answers, one over the limit, the refusal");
    sessions_open(&node, 0).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_utf8_text_frame_fails_the_connection_with_1007() {
    // Proves RFC 6455 section 8.1: a text frame that is not UTF-8 closes the connection with
    // status 1007 (it closed with no status, which clients report as 1005).
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let mut p = Peer::connect(node.addr()).await;
    let frame = Frame::message(
        &b"{\"op\":\"ping\",\"ref\":\xff}"[..],
        OpCode::Data(Data::Text),
        true,
    );
    p.ws.send(Message::Frame(frame)).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, p.ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(c)))) => {
                assert_eq!(u16::from(c.code), 1007, "{c:?}");
                break;
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a status"),
            Some(Err(e)) => panic!("{e}"),
            Some(Ok(_)) => continue,
        }
    }
    sessions_open(&node, 0).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_session_are_bounded() {
    // Proves session_subscriptions_max on a real session: one subscription more is too_large
    // with its ref and a message naming the limit; unsubscribing makes room.
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(dir.path(), |c| c.session_subscriptions_max = 3).await;
    let ta = mesh_with_peer(&base(&node)).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    for (r, conv) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
        a.send(json!({"op":"subscribe","ref":r,"conv":conv})).await;
    }
    let got = a.collect(4, |v| v.get("ref").is_some()).await;
    let refused: Vec<&Value> = got.iter().filter(|v| v["op"] == "error").collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0]["ref"].clone(), refused[0]["code"].clone()),
        (json!(4), json!("too_large"))
    );
    assert!(refused[0]["message"]
        .as_str()
        .unwrap()
        .contains("session_subscriptions_max"));
    a.send(json!({"op":"unsubscribe","ref":5,"conv":"a"})).await;
    a.send(json!({"op":"subscribe","ref":6,"conv":"d"})).await;
    let got = a.collect(2, |v| v.get("ref").is_some()).await;
    assert!(got.iter().all(|v| v["op"] == "ok"), "{got:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_after_hello_is_unauthorized_as_documented() {
    // Proves `challenge` after the session's hello answers unauthorized ("already used"), not
    // bad_request, and the session stays open.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let ta = mesh_with_peer(&base(&node)).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    a.send(json!({"op":"challenge"})).await;
    let e = a.recv().await;
    assert_eq!(e["code"], "unauthorized");
    assert!(
        e["message"].as_str().unwrap().contains("already used"),
        "{e}"
    );
    a.send(json!({"op":"ping","ref":2})).await;
    assert_eq!(a.recv().await["op"], "pong");
    node.shutdown().await;
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_subscription_stream_nobody_reads_blocks_nothing_else() {
    // Proves QUIC streams are independent: with one subscription stream unread (10 MB of
    // events, past its 8 MiB flow-control window), answers on the control stream and events on
    // another subscription's stream keep flowing; after write_timeout_ms without progress on
    // the stuck stream the session is closed with overloaded naming its conversation.
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(dir.path(), |c| c.write_timeout_ms = 3000).await;
    let ta = mesh_with_peer(&base(&node)).await;
    let (mut w, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    let body = format!("\"{}\"", "q".repeat(1_000_000));
    for r in 0..10 {
        w.send_text(&format!(
            r#"{{"op":"append","ref":{r},"conv":"stuck","body":{body}}}"#
        ))
        .await;
        w.recv().await;
    }
    let conn = quic_raw(&node).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut control = fabric::quic::FrameReader::new(recv, 2 << 20);
    quic_write(
        &mut send,
        &ClientOp::Hello {
            mesh: MeshId::must("m"),
            peer: PeerId::must("a"),
            token: ta.clone(),
        },
    )
    .await;
    assert!(matches!(
        quic_ops(&mut control).await[..],
        [ServerOp::Welcome { .. }]
    ));
    let sub = |r, conv: &str| ClientOp::Subscribe {
        r,
        conv: ConvId::must(conv),
        from: 1,
    };
    quic_write(&mut send, &sub(1, "stuck")).await;
    quic_write(&mut send, &sub(2, "live")).await;
    let started = Instant::now();
    // "stuck"'s stream is accepted and never read; "live"'s is read.
    let _stuck = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    for i in 0..5u64 {
        w.send(json!({"op":"append","ref":100 + i,"conv":"live","body":i}))
            .await;
        w.recv().await;
    }
    let live = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let mut live = fabric::quic::FrameReader::new(live, 2 << 20);
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        for op in quic_ops(&mut live).await {
            if let ServerOp::Event(e) = op {
                seqs.push(e.seq);
            }
        }
    }
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    quic_write(&mut send, &ClientOp::Ping { r: 7 }).await;
    let mut closed_for = None;
    let mut ponged_at = None;
    while closed_for.is_none() {
        for op in quic_ops(&mut control).await {
            match op {
                ServerOp::Pong { r: 7 } => ponged_at = Some(started.elapsed()),
                ServerOp::Error {
                    code: fabric_proto::ErrorCode::Overloaded,
                    message,
                    ..
                } => closed_for = Some(message),
                _ => {}
            }
        }
    }
    let ponged_at = ponged_at.expect("the control stream answered while a stream was stuck");
    assert!(ponged_at < Duration::from_millis(3000), "{ponged_at:?}");
    let why = closed_for.unwrap();
    assert!(why.contains("conversation stuck"), "{why}");
    sessions_open(&node, 1).await;
    node.shutdown().await;
}
