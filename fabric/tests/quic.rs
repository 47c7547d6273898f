//! The QUIC transport end to end: the Rust client over `quic://` (sends, appends, deliveries,
//! subscriptions on streams of their own, connection migration), the node's certificate, and
//! every refusal (wrong ALPN, wrong pin, a stream reset mid-frame, an oversize frame), after
//! each of which the node keeps serving.

mod common;
use common::*;
use fabric::client::{Client, ClientConfig, ClientError, Incoming};
use fabric::node::RunningNode;
use fabric::tls::Trust;
use fabric_proto::{codec, ClientOp, ServerOp};
use fabric_proto::{ConvId, MeshId, PeerId};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn quic_url(node: &RunningNode) -> String {
    format!(
        "quic://{}",
        node.quic_addr().expect("QUIC is on by default")
    )
}

async fn quic_client(node: &RunningNode, peer: &str, token: &str) -> Client {
    let cfg = ClientConfig::new(&quic_url(node), "m", peer, token)
        .with_pin(node.tls_fingerprint().expect("a certificate"));
    Client::connect(cfg).await.expect("QUIC client connects")
}

/// A raw QUIC connection with the node's pin, offering `alpn`.
async fn raw(node: &RunningNode, alpn: &[u8]) -> Result<quinn::Connection, String> {
    let cfg = fabric::quic::client_config(&Trust::Pin(node.tls_fingerprint().unwrap()), alpn)
        .map_err(|e| e.to_string())?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(node.quic_addr().unwrap(), "localhost")
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(WAIT, conn)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

async fn read_ops(recv: &mut fabric::quic::FrameReader) -> Vec<ServerOp> {
    let frame = tokio::time::timeout(WAIT, recv.next())
        .await
        .expect("a frame in time")
        .expect("readable")
        .expect("not the end");
    match frame {
        fabric::quic::ReadFrame::Frame(b) => codec::decode_server_binary(&b).expect("postcard"),
        fabric::quic::ReadFrame::Oversize(n) => panic!("oversize {n}"),
    }
}

async fn write_op(send: &mut quinn::SendStream, op: &ClientOp) {
    send.write_all(&fabric::quic::frame(&codec::encode_client_binary(op)))
        .await
        .unwrap();
}

fn hello(token: &str) -> ClientOp {
    ClientOp::Hello {
        mesh: MeshId::must("m"),
        peer: PeerId::must("a"),
        token: token.into(),
    }
}

#[tokio::test]
async fn quic_clients_send_append_subscribe_and_receive() {
    // Proves the whole message set works over QUIC with the same session core: durable sends
    // and appends, inbox delivery with acks, and a subscription's replay and tail.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let tb = add_peer(&b, "m", "b", &[]).await;
    let a = Arc::new(quic_client(&node, "a", &ta).await);
    let bob = quic_client(&node, "b", &tb).await;
    let seq1 = a
        .append("chat", &json!({"n": 1}), Some("k1"))
        .await
        .unwrap();
    assert_eq!(seq1, 1);
    bob.subscribe("chat", 1).await.unwrap();
    let pos = a.send("b", &json!({"hi": "bob"})).await.unwrap();
    a.append("chat", &json!({"n": 2}), None).await.unwrap();
    let mut got_event = Vec::new();
    let mut got_pos = None;
    while got_event.len() < 2 || got_pos.is_none() {
        match tokio::time::timeout(WAIT, bob.next_delivery())
            .await
            .unwrap()
        {
            Some(Incoming::Event { seq, .. }) => got_event.push(seq),
            Some(Incoming::Deliver { pos, .. }) => got_pos = Some(pos),
            None => panic!("connection lost"),
        }
    }
    assert_eq!(got_event, vec![1, 2]);
    assert_eq!(got_pos, Some(pos));
    bob.ack(pos).await.unwrap();
    // 100 pipelined appends over one QUIC connection, all durable and dense.
    let seqs = futures_util::future::join_all((0..100).map(|i| {
        let a = a.clone();
        async move { a.append("bulk", &json!({"i": i}), None).await.unwrap() }
    }))
    .await;
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=100).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_quic_session_survives_a_change_of_client_address() {
    // Proves connection migration: after the client's UDP socket changes (as when a phone
    // changes networks), the same session keeps answering and delivering, with no reconnect.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let tb = add_peer(&b, "m", "b", &[]).await;
    let a = quic_client(&node, "a", &ta).await;
    let bob = quic_client(&node, "b", &tb).await;
    let session = a.session();
    a.append("c", &json!({}), None).await.unwrap();
    let before = a.append("c", &json!({}), None).await.unwrap();
    let new_addr = a.rebind().expect("rebinds");
    assert_ne!(new_addr.port(), 0);
    let after = a.append("c", &json!({}), None).await.unwrap();
    assert_eq!(after, before + 1);
    assert_eq!(a.session(), session, "same session: no reconnect happened");
    assert!(a.is_connected());
    // Pushes reach the moved client too.
    let pos = bob.send("a", &json!({"to": "moved"})).await.unwrap();
    match tokio::time::timeout(WAIT, a.next_delivery()).await.unwrap() {
        Some(Incoming::Deliver { pos: p, .. }) => assert_eq!(p, pos),
        other => panic!("expected the delivery, got {other:?}"),
    }
    let ws = Client::connect(ClientConfig::new(
        &format!("ws://{}/v1/ws", node.addr()),
        "m",
        "b",
        &tb,
    ))
    .await
    .unwrap();
    assert!(
        matches!(ws.rebind(), Err(ClientError::Invalid { .. })),
        "WebSocket sessions cannot migrate"
    );
}

#[tokio::test]
async fn wrong_alpn_and_wrong_pin_are_refused_and_the_node_keeps_serving() {
    // Proves the handshake guards: a client offering another ALPN is refused by the node, a
    // client pinning another certificate refuses the node, and a correct client still works.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let err = raw(&node, b"h3").await.expect_err("wrong ALPN refused");
    assert!(
        err.to_lowercase().contains("alpn") || err.contains("120"),
        "{err}"
    );
    let mut cfg = ClientConfig::new(&quic_url(&node), "m", "a", &ta).with_pin([7; 32]);
    cfg.connect_timeout_ms = 5_000;
    match Client::connect(cfg).await {
        Err(ClientError::Quic(e)) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("expected a certificate failure, got {other:?}"),
    }
    let no_trust = ClientConfig::new(&quic_url(&node), "m", "a", &ta);
    assert!(matches!(
        Client::connect(no_trust).await,
        Err(ClientError::Quic(e)) if e.contains("pin")
    ));
    let ok = quic_client(&node, "a", &ta).await;
    ok.append("still", &json!({}), None).await.unwrap();
}

#[tokio::test]
async fn a_stream_reset_mid_frame_ends_only_that_session() {
    // Proves a control stream reset halfway through a frame closes that session cleanly (its
    // shards forget it) while the node and other sessions carry on.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let conn = raw(&node, fabric::tls::ALPN).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = fabric::quic::FrameReader::new(recv, 1 << 20);
    write_op(&mut send, &hello(&ta)).await;
    assert!(matches!(
        read_ops(&mut recv).await[0],
        ServerOp::Welcome { .. }
    ));
    // A prefix announcing 100 bytes, 10 of them, then a reset.
    send.write_all(&100u32.to_le_bytes()).await.unwrap();
    send.write_all(&[0u8; 10]).await.unwrap();
    send.reset(quinn::VarInt::from_u32(7)).unwrap();
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the node closes it");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    let ok = quic_client(&node, "a", &ta).await;
    assert_eq!(ok.append("after-reset", &json!({}), None).await.unwrap(), 1);
}

#[tokio::test]
async fn an_oversize_frame_gets_too_large_and_the_session_goes_on() {
    // Proves the frame limit over QUIC: a length prefix above frame_bytes_max is answered
    // too_large (its bytes skipped, never buffered whole) and the same session then works.
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        frame_bytes_max: 4096,
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let conn = raw(&node, fabric::tls::ALPN).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = fabric::quic::FrameReader::new(recv, 1 << 20);
    write_op(&mut send, &hello(&ta)).await;
    assert!(matches!(
        read_ops(&mut recv).await[0],
        ServerOp::Welcome { .. }
    ));
    let big = vec![b'x'; 100_000];
    send.write_all(&fabric::quic::frame(&big)).await.unwrap();
    match &read_ops(&mut recv).await[0] {
        ServerOp::Error { code, .. } => assert_eq!(*code, fabric_proto::ErrorCode::TooLarge),
        other => panic!("expected too_large, got {other:?}"),
    }
    write_op(&mut send, &ClientOp::Ping { r: 9 }).await;
    assert_eq!(read_ops(&mut recv).await, vec![ServerOp::Pong { r: 9 }]);
}

#[tokio::test]
async fn each_subscription_gets_a_stream_of_its_own() {
    // Proves the stream layout: answers and deliveries come on the control stream, and each
    // subscribed conversation's events on a unidirectional stream the node opens for it.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let writer = quic_client(&node, "a", &ta).await;
    writer.append("one", &json!({"c": 1}), None).await.unwrap();
    writer.append("two", &json!({"c": 2}), None).await.unwrap();
    let conn = raw(&node, fabric::tls::ALPN).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = fabric::quic::FrameReader::new(recv, 1 << 20);
    write_op(&mut send, &hello(&ta)).await;
    assert!(matches!(
        read_ops(&mut recv).await[0],
        ServerOp::Welcome { .. }
    ));
    for (r, conv) in [(1, "one"), (2, "two")] {
        write_op(
            &mut send,
            &ClientOp::Subscribe {
                r,
                conv: ConvId::must(conv),
                from: 1,
            },
        )
        .await;
    }
    let mut convs = Vec::new();
    for _ in 0..2 {
        let uni = tokio::time::timeout(WAIT, conn.accept_uni())
            .await
            .unwrap()
            .unwrap();
        let mut uni = fabric::quic::FrameReader::new(uni, 1 << 20);
        match &read_ops(&mut uni).await[0] {
            ServerOp::Event(e) => convs.push(e.conv.to_string()),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    convs.sort();
    assert_eq!(convs, vec!["one", "two"]);
    let mut oks = 0;
    while oks < 2 {
        for op in read_ops(&mut recv).await {
            assert!(
                matches!(op, ServerOp::Ok { .. }),
                "control stream carries answers: {op:?}"
            );
            oks += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn the_generated_certificate_is_kept_and_unique_per_node() {
    // Proves the certificate rules: generated on first start in the data dir, the same after a
    // restart (clients' pins stay valid), and a different one, with a distinct common name,
    // for another node.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let first = node.tls_fingerprint().unwrap();
    node.shutdown().await;
    let node = start(dir.path()).await;
    assert_eq!(node.tls_fingerprint().unwrap(), first);
    let other_dir = tempfile::tempdir().unwrap();
    let other = start(other_dir.path()).await;
    assert_ne!(other.tls_fingerprint().unwrap(), first);
    let cn = |d: &std::path::Path| {
        let pem = std::fs::read_to_string(d.join("tls/cert.pem")).unwrap();
        let der = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>();
        let der = base64_decode(&der);
        let at = der
            .windows(12)
            .position(|w| w == b"fabric node ")
            .expect("a fabric common name");
        der[at..at + 28].to_vec()
    };
    assert_ne!(cn(dir.path()), cn(other_dir.path()));
}

/// Standard base64 (the PEM body), without a dependency for one test.
fn base64_decode(s: &str) -> Vec<u8> {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ABC.iter().position(|x| *x == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn the_same_certificate_serves_wss_and_https_when_tls_is_on() {
    // Proves --ws-tls: the HTTP port speaks TLS with the QUIC certificate (one pin for
    // https://, wss:// and quic://), plain ws:// to it fails, and both transports work.
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        ws_tls: true,
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let pin = node.tls_fingerprint().unwrap();
    let base = format!("https://localhost:{}", node.addr().port());
    let admin = fabric::client::Admin::with_trust(&base, "admin-secret", &Trust::Pin(pin)).unwrap();
    admin.create_mesh("m").await.unwrap();
    let token = admin.add_peer("m", "a", &[]).await.unwrap();
    let wss = format!("wss://localhost:{}/v1/ws", node.addr().port());
    let c = Client::connect(ClientConfig::new(&wss, "m", "a", &token).with_pin(pin))
        .await
        .expect("wss connects with the pin");
    assert_eq!(c.append("t", &json!({}), None).await.unwrap(), 1);
    let q = quic_client(&node, "a", &token).await;
    assert_eq!(q.append("t", &json!({}), None).await.unwrap(), 2);
    let mut plain = ClientConfig::new(
        &format!("ws://127.0.0.1:{}/v1/ws", node.addr().port()),
        "m",
        "a",
        &token,
    );
    plain.connect_timeout_ms = 3_000;
    assert!(
        Client::connect(plain).await.is_err(),
        "plain ws:// to a TLS port"
    );
    let wrong = ClientConfig::new(&wss, "m", "a", &token).with_pin([1; 32]);
    assert!(
        Client::connect(wrong).await.is_err(),
        "a wrong pin is refused"
    );
}

#[tokio::test]
async fn a_frame_reader_cancelled_mid_frame_loses_no_bytes() {
    // Proves FrameReader::next is cancel-safe, which lets the node read its control stream
    // inside the session's select!: a frame and an oversize frame arrive in pieces, every
    // read before the last piece is cancelled partway, and both still come out whole.
    let dir = tempfile::tempdir().unwrap();
    let id = fabric::tls::load_or_generate(None, None, dir.path(), &["localhost".into()]).unwrap();
    let crypto = fabric::tls::server_config(&id, fabric::tls::ALPN).unwrap();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap(),
    ));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let trust = Trust::Pin(id.fingerprint());
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (_send, recv) = conn.accept_bi().await.unwrap();
        (server, conn, recv)
    });
    let client = fabric::quic::dial("127.0.0.1", addr.port(), &trust, fabric::tls::ALPN)
        .await
        .unwrap();
    let mut send = client.send;
    // The stream opens with the first bytes; the reader then waits for the rest.
    send.write_all(&fabric::quic::frame(b"x")).await.unwrap();
    let (_server, _conn, recv) = accept.await.unwrap();
    const READ_FRAME_BYTES_MAX: usize = 100;
    let mut reader = fabric::quic::FrameReader::new(recv, READ_FRAME_BYTES_MAX);
    let next = async |reader: &mut fabric::quic::FrameReader| {
        tokio::time::timeout(WAIT, reader.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert!(matches!(next(&mut reader).await, fabric::quic::ReadFrame::Frame(b) if &b[..] == b"x"));
    // Each piece is given time to arrive; a read then finds a partial frame and is dropped.
    async fn piece(
        send: &mut quinn::SendStream,
        reader: &mut fabric::quic::FrameReader,
        bytes: &[u8],
    ) {
        send.write_all(bytes).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            futures_util::FutureExt::now_or_never(reader.next()).is_none(),
            "a partial frame is not a frame"
        );
    }
    let whole = fabric::quic::frame(&[7u8; 80]);
    piece(&mut send, &mut reader, &whole[..2]).await;
    piece(&mut send, &mut reader, &whole[2..30]).await;
    send.write_all(&whole[30..]).await.unwrap();
    assert!(
        matches!(next(&mut reader).await, fabric::quic::ReadFrame::Frame(b) if b[..] == [7u8; 80])
    );
    let oversize = fabric::quic::frame(&[9u8; 300]);
    piece(&mut send, &mut reader, &oversize[..150]).await;
    piece(&mut send, &mut reader, &oversize[150..250]).await;
    send.write_all(&oversize[250..]).await.unwrap();
    send.write_all(&fabric::quic::frame(b"after"))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut reader).await,
        fabric::quic::ReadFrame::Oversize(300)
    ));
    assert!(
        matches!(next(&mut reader).await, fabric::quic::ReadFrame::Frame(b) if &b[..] == b"after")
    );
}

#[tokio::test]
async fn every_transport_label_in_metrics_is_documented() {
    // Proves docs/OPERATIONS.md lists every `transport` label value the node exports (it
    // omitted `quic`), after a QUIC session has run.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let b = base(&node);
    let ta = mesh_with_peer(&b).await;
    let a = quic_client(&node, "a", &ta).await;
    a.append("c", &json!(1), None).await.unwrap();
    let text = metrics_text(&b).await;
    let mut exported: Vec<&str> = text
        .split("transport=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    exported.sort();
    exported.dedup();
    assert!(exported.contains(&"quic"), "{exported:?}");
    let ops = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/OPERATIONS.md"
    ))
    .unwrap();
    let listed = ops
        .split("Labels are bounded: `transport` (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("OPERATIONS.md lists the transport labels");
    for t in exported {
        assert!(
            listed.contains(&format!("`{t}`")),
            "transport {t:?} is not in {listed:?}"
        );
    }
    node.shutdown().await;
}
