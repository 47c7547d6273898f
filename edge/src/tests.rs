//! Session core tests: an in-memory driver plays the glue (frames in, transmits out) and the
//! shards (replies in, requests out).

use super::*;
use fabric_proto::{Body, DeliveredEvent, Target};

const NOW: u64 = 1_000_000;
const ID: SessionId = 7;

fn session_with(config: SessionConfig) -> Session {
    Session::new(ID, NOW, config)
}

fn session() -> Session {
    session_with(SessionConfig::default())
}

fn text(s: &mut Session, json: &str) {
    s.handle_frame(
        NOW,
        InFrame {
            binary: false,
            bytes: json.as_bytes(),
        },
    );
}

fn binary(s: &mut Session, op: &ClientOp) {
    s.handle_frame(
        NOW,
        InFrame {
            binary: true,
            bytes: &codec::encode_client_binary(op),
        },
    );
}

/// Every queued JSON frame, parsed.
fn frames(s: &mut Session) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Some(f) = s.poll_transmit() {
        assert!(!f.binary, "a JSON session answers in text frames");
        out.push(serde_json::from_slice(&f.bytes).expect("valid JSON frame"));
    }
    out
}

fn codes(frames: &[serde_json::Value]) -> Vec<String> {
    frames
        .iter()
        .map(|v| v["code"].as_str().unwrap_or("-").to_string())
        .collect()
}

/// Every queued request, checked to belong to this session.
fn requests(s: &mut Session) -> Vec<(Route, ShardOp)> {
    let mut out = Vec::new();
    while let Some((route, req)) = s.poll_request() {
        assert_eq!(req.session, ID);
        out.push((route, req.op));
    }
    out
}

fn welcome_reply() -> Reply {
    Reply::Frame(ServerOp::Welcome {
        session: ID,
        acked: 0,
        head: 0,
        nodes: Vec::new(),
    })
}

/// A token hello in a binary frame (which makes the session binary).
fn binary_hello(s: &mut Session) {
    binary(
        s,
        &ClientOp::Hello {
            mesh: MeshId::must("m"),
            peer: PeerId::must("p"),
            token: "t".into(),
        },
    );
}

fn hello(s: &mut Session) {
    text(s, r#"{"op":"hello","mesh":"m","peer":"p","token":"t"}"#);
}

/// Hello, welcome, and both drained: an open session with empty queues.
fn welcome(s: &mut Session) {
    hello(s);
    let reqs = requests(s);
    assert!(matches!(&reqs[..], [(Route::ByKey, ShardOp::Hello { .. })]));
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(frames(s)[0]["op"], "welcome");
}

fn append(s: &mut Session, r: u64) {
    text(
        s,
        &format!(r#"{{"op":"append","ref":{r},"conv":"c","body":1}}"#),
    );
}

fn ok(r: u64) -> Reply {
    Reply::Frame(ServerOp::Ok {
        r,
        pos: Some(r),
        seq: None,
    })
}

fn event(seq: u64) -> Reply {
    Reply::Frame(ServerOp::Event(DeliveredEvent {
        conv: "c".into(),
        seq,
        from: "q".into(),
        body: Body::from_json_text("1").unwrap(),
        ts: 1,
    }))
}

fn deliver(pos: u64) -> Reply {
    Reply::Frame(ServerOp::Deliver {
        pos,
        from: "q".into(),
        to: Target::All,
        body: Body::from_json_text("1").unwrap(),
        ts: 1,
    })
}

fn closes(reqs: &[(Route, ShardOp)]) -> usize {
    reqs.iter()
        .filter(|(route, op)| *op == ShardOp::Closed && *route == Route::AllShards)
        .count()
}

#[test]
fn a_clustered_nodes_welcome_names_every_node() {
    // Proves the edge adds its node list to the shard's welcome (the shard does not know the
    // cluster's client URLs), and a single node's welcome stays without `nodes`.
    let nodes: Vec<Arc<str>> = vec!["http://10.0.0.1:7400".into(), "http://10.0.0.2:7400".into()];
    let mut s = session_with(SessionConfig {
        nodes: nodes.into(),
        ..SessionConfig::default()
    });
    hello(&mut s);
    let _ = requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(
        frames(&mut s),
        vec![
            serde_json::json!({"op":"welcome","session":7,"acked":0,"head":0,
            "nodes":["http://10.0.0.1:7400","http://10.0.0.2:7400"]})
        ]
    );
}

#[test]
fn hello_welcome_send_ok() {
    // Proves the happy path: hello is forwarded, welcome opens, send carries mesh and peer.
    let mut s = session();
    assert_eq!(s.id(), ID);
    assert!(s.identity().is_none());
    hello(&mut s);
    match &requests(&mut s)[..] {
        [(
            Route::ByKey,
            ShardOp::Hello {
                mesh,
                peer,
                token,
                proof: None,
            },
        )] => {
            assert_eq!((&**mesh, &**peer, token.as_str()), ("m", "p", "t"));
        }
        other => panic!("{other:?}"),
    }
    assert!(s.identity().is_none(), "not before welcome");
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(
        frames(&mut s),
        vec![serde_json::json!({"op":"welcome","session":7,"acked":0,"head":0})]
    );
    assert_eq!(
        s.identity().map(|(m, p)| (m.to_string(), p.to_string())),
        Some(("m".into(), "p".into()))
    );
    assert_eq!(
        s.poll_timeout(),
        Some(NOW + 30_000),
        "no hello deadline once open: the first ping's"
    );
    text(&mut s, r#"{"op":"send","ref":1,"to":"q","body":{"x":1}}"#);
    match &requests(&mut s)[..] {
        [(
            Route::ByKey,
            ShardOp::Send {
                r: 1,
                mesh,
                from,
                to: Target::Peer(q),
                body,
                key: None,
            },
        )] => {
            assert_eq!(
                (&**mesh, &**from, &**q, body.as_str()),
                ("m", "p", "q", r#"{"x":1}"#)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.inflight(), 1);
    s.handle_reply(NOW, 0, ok(1));
    assert_eq!(
        frames(&mut s),
        vec![serde_json::json!({"op":"ok","ref":1,"pos":1})]
    );
    assert_eq!(s.inflight(), 0);
    assert_eq!(s.encoding(), Some(Encoding::Json));
    let st = s.stats();
    assert_eq!(
        (st.frames_in, st.frames_out, st.requests_forwarded),
        (2, 2, 2)
    );
    assert!(st.bytes_in > 0 && st.bytes_out > 0);
}

#[test]
fn every_open_op_maps_to_its_shard_op() {
    // Proves append, subscribe, unsubscribe and ack carry the session's mesh (and peer), and
    // ping is answered locally without a request.
    let mut s = session();
    welcome(&mut s);
    text(
        &mut s,
        r#"[{"op":"append","ref":1,"conv":"c","body":"x","key":"k"},
            {"op":"subscribe","ref":2,"conv":"c","from":5},
            {"op":"unsubscribe","ref":3,"conv":"c"},
            {"op":"ack","upto":9},
            {"op":"ping","ref":4}]"#,
    );
    let reqs = requests(&mut s);
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(reqs.iter().all(|(route, _)| *route == Route::ByKey));
    match &reqs[0].1 {
        ShardOp::Append {
            r: 1,
            mesh,
            conv,
            from,
            body,
            key: Some(k),
        } => assert_eq!(
            (&**mesh, &**conv, &**from, body.as_str(), &**k),
            ("m", "c", "p", "\"x\"", "k")
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&reqs[1].1, ShardOp::Subscribe { r: 2, mesh, conv, from: 5 } if &**mesh == "m" && &**conv == "c")
    );
    assert!(matches!(&reqs[2].1, ShardOp::Unsubscribe { r: 3, mesh, .. } if &**mesh == "m"));
    assert!(
        matches!(&reqs[3].1, ShardOp::Ack { mesh, peer, upto: 9 } if &**mesh == "m" && &**peer == "p")
    );
    assert_eq!(s.inflight(), 3, "ack and ping are not in flight");
    assert_eq!(
        frames(&mut s),
        vec![serde_json::json!({"op":"pong","ref":4})]
    );
}

#[test]
fn inflight_limit_turns_reading_off_and_acks_turn_it_on() {
    // Proves backpressure: at the in-flight limit wants_read is false until answers (ok or
    // error with a ref, in any order) arrive.
    let mut s = session_with(SessionConfig {
        inflight_requests_max: 3,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    for r in 1..=3 {
        assert!(s.wants_read());
        append(&mut s, r);
    }
    assert!(!s.wants_read());
    s.handle_reply(NOW, 0, ok(2)); // answers may come in any order
    assert!(s.wants_read());
    append(&mut s, 4);
    assert!(!s.wants_read());
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::error(
            Some(4),
            ProtoError::new(ErrorCode::NotFound, "no such peer"),
        )),
    );
    assert!(s.wants_read(), "an error with a ref answers its request");
    assert_eq!(s.inflight(), 2);
    // Acks and pings do not count.
    text(&mut s, r#"[{"op":"ack","upto":1},{"op":"ping","ref":9}]"#);
    assert_eq!(s.inflight(), 2);
}

#[test]
fn a_glue_that_ignores_wants_read_hits_a_hard_cap() {
    // Proves in-flight work stays bounded even if the transport keeps reading: past the limit
    // plus one batch, requests are refused with overloaded and the session stays open.
    let mut s = session_with(SessionConfig {
        inflight_requests_max: 1,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    let hard = 1 + BATCH_OPS_MAX as u64;
    for r in 1..=hard + 2 {
        append(&mut s, r);
    }
    assert_eq!(s.inflight() as u64, hard);
    assert_eq!(requests(&mut s).len() as u64, hard);
    let f = frames(&mut s);
    assert_eq!(codes(&f), vec!["overloaded", "overloaded"]);
    assert_eq!(f[0]["ref"], hard + 1);
    assert!(!s.is_closed());
}

#[test]
fn ops_before_hello_are_refused_and_close() {
    // Proves an op before hello gets unauthorized, the session closes, and no request leaks
    // (not even Closed: no shard knows a session that never said hello).
    let mut s = session();
    text(
        &mut s,
        r#"[{"op":"send","ref":4,"to":"q","body":1},{"op":"ping","ref":5}]"#,
    );
    let f = frames(&mut s);
    assert_eq!(f.len(), 1, "the rest of the batch is dropped: {f:?}");
    assert_eq!(
        (f[0]["code"].as_str(), f[0]["ref"].as_u64()),
        (Some("unauthorized"), Some(4))
    );
    assert!(f[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("send hello first"));
    assert!(s.is_closed());
    assert!(!s.wants_read());
    assert!(requests(&mut s).is_empty());
    s.handle_transport_closed(NOW);
    assert!(requests(&mut s).is_empty());
}

#[test]
fn a_refused_hello_closes_and_tells_the_shards() {
    // Proves an error answer to hello is transmitted, closes the session and detaches it.
    let mut s = session();
    text(
        &mut s,
        r#"{"op":"hello","mesh":"m","peer":"p","token":"bad"}"#,
    );
    requests(&mut s);
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::error(
            None,
            ProtoError::new(ErrorCode::Unauthorized, "wrong token"),
        )),
    );
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["code"].as_str(), f[0]["message"].as_str()),
        (Some("unauthorized"), Some("wrong token"))
    );
    assert!(s.is_closed());
    assert!(s.identity().is_none());
    assert_eq!(requests(&mut s), vec![(Route::AllShards, ShardOp::Closed)]);
}

#[test]
fn a_second_hello_is_a_bad_request() {
    // Proves hello is refused with bad_request both while authenticating and once open, and
    // the session stays open.
    let mut s = session();
    hello(&mut s);
    hello(&mut s);
    assert_eq!(codes(&frames(&mut s)), vec!["bad_request"]);
    assert_eq!(
        requests(&mut s).len(),
        1,
        "only the first hello is forwarded"
    );
    s.handle_reply(NOW, 0, welcome_reply());
    hello(&mut s);
    assert_eq!(codes(&frames(&mut s)), vec!["-", "bad_request"]);
    assert!(requests(&mut s).is_empty());
    assert!(!s.is_closed());
}

#[test]
fn hello_times_out() {
    // Proves a session that never completes hello is closed at its deadline, not before.
    let mut s = session();
    assert_eq!(s.poll_timeout(), Some(NOW + 10_000));
    s.handle_timeout(NOW + 9_999);
    assert!(!s.is_closed());
    s.handle_timeout(NOW + 10_000);
    assert!(s.is_closed());
    assert_eq!(s.poll_timeout(), None);
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["code"].as_str(), f[0]["message"].as_str()),
        (Some("unauthorized"), Some("hello timed out"))
    );
    assert!(requests(&mut s).is_empty(), "never attached");
}

#[test]
fn hello_timeout_while_authenticating_detaches() {
    // Proves a hello the shard never answers times out too, and the shards hear Closed.
    let mut s = session_with(SessionConfig {
        hello_timeout_ms: 50,
        ..SessionConfig::default()
    });
    hello(&mut s);
    requests(&mut s);
    assert_eq!(s.poll_timeout(), Some(NOW + 50));
    s.handle_timeout(NOW + 50);
    assert!(s.is_closed());
    assert_eq!(codes(&frames(&mut s)), vec!["unauthorized"]);
    assert_eq!(requests(&mut s), vec![(Route::AllShards, ShardOp::Closed)]);
    // A late welcome changes nothing.
    s.handle_reply(NOW + 60, 0, welcome_reply());
    assert!(frames(&mut s).is_empty() && s.identity().is_none());
}

#[test]
fn a_welcomed_session_does_not_time_out() {
    // Proves the hello deadline stops mattering once welcomed.
    let mut s = session();
    welcome(&mut s);
    s.handle_timeout(NOW + 1_000_000);
    assert!(!s.is_closed());
    assert!(frames(&mut s).is_empty());
}

#[test]
fn oversize_and_malformed_frames_get_errors_and_the_session_stays_open() {
    // Proves too_large (naming size and limit) and bad_request leave the session usable.
    let mut s = session_with(SessionConfig {
        frame_bytes_max: 64,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    let big = format!(r#"{{"op":"ping","ref":1,"pad":"{}"}}"#, "x".repeat(100));
    text(&mut s, &big);
    text(&mut s, "{oops");
    text(&mut s, r#"{"op":"fly","ref":3}"#);
    text(&mut s, r#"{"op":"ping","ref":2}"#);
    let f = frames(&mut s);
    assert_eq!(
        codes(&f),
        vec!["too_large", "bad_request", "bad_request", "-"]
    );
    let msg = f[0]["message"].as_str().unwrap();
    assert!(
        msg.contains(&big.len().to_string()) && msg.contains("64"),
        "{msg}"
    );
    assert!(f[0].get("ref").is_none(), "frame errors carry no ref");
    assert_eq!(f[3], serde_json::json!({"op":"pong","ref":2}));
    assert!(!s.is_closed());
    assert!(requests(&mut s).is_empty());
    assert_eq!(s.stats().errors_sent, 3);
}

#[test]
fn bad_frames_before_hello_keep_the_session_waiting_for_hello() {
    // Proves a malformed or oversize first frame is answered but does not close the session,
    // and the error uses the encoding of that first frame.
    let mut s = session_with(SessionConfig {
        frame_bytes_max: 64,
        ..SessionConfig::default()
    });
    s.handle_frame(
        NOW,
        InFrame {
            binary: true,
            bytes: &[0xff, 0xff, 0xff],
        },
    );
    assert_eq!(s.encoding(), Some(Encoding::Binary));
    let f = s.poll_transmit().unwrap();
    assert!(f.binary);
    assert!(matches!(
        codec::decode_server_binary(&f.bytes).unwrap()[..],
        [ServerOp::Error {
            r: None,
            code: ErrorCode::BadRequest,
            ..
        }]
    ));
    assert!(!s.is_closed() && s.wants_read());
    binary_hello(&mut s);
    assert!(matches!(
        &requests(&mut s)[..],
        [(Route::ByKey, ShardOp::Hello { .. })]
    ));
}

#[test]
fn binary_sessions_get_binary_replies_and_batches_work() {
    // Proves the first frame picks the encoding, and a batch frame yields every op in order.
    let mut s = session();
    binary_hello(&mut s);
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    let f = s.poll_transmit().unwrap();
    assert!(f.binary);
    assert!(matches!(
        codec::decode_server_binary(&f.bytes).unwrap()[..],
        [ServerOp::Welcome { session: ID, .. }]
    ));
    binary(
        &mut s,
        &ClientOp::Batch(vec![
            ClientOp::Ping { r: 1 },
            ClientOp::Append {
                r: 2,
                conv: ConvId::must("c"),
                body: Body::from_json_text("1").unwrap(),
                key: None,
            },
        ]),
    );
    assert!(matches!(
        &requests(&mut s)[..],
        [(Route::ByKey, ShardOp::Append { r: 2, .. })]
    ));
    let f = s.poll_transmit().unwrap();
    assert_eq!(
        codec::decode_server_binary(&f.bytes).unwrap(),
        vec![ServerOp::Pong { r: 1 }]
    );
    s.handle_reply(NOW, 0, ok(2));
    let f = s.poll_transmit().unwrap();
    assert!(f.binary);
    assert_eq!(
        codec::decode_server_binary(&f.bytes).unwrap(),
        vec![ServerOp::Ok {
            r: 2,
            pos: Some(2),
            seq: None
        }]
    );
    // A text frame on a binary session is still understood; the answer stays binary.
    text(&mut s, r#"{"op":"ping","ref":3}"#);
    assert!(s.poll_transmit().unwrap().binary);
}

#[test]
fn json_batches_run_every_op_in_order() {
    // Proves a JSON array frame is handled op by op, answers and requests in order.
    let mut s = session();
    welcome(&mut s);
    text(
        &mut s,
        r#"[{"op":"ping","ref":1},{"op":"append","ref":2,"conv":"a","body":1},{"op":"ping","ref":3},{"op":"append","ref":4,"conv":"b","body":2}]"#,
    );
    let refs: Vec<u64> = requests(&mut s)
        .into_iter()
        .map(|(_, op)| match op {
            ShardOp::Append { r, .. } => r,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(refs, vec![2, 4]);
    let pongs: Vec<u64> = frames(&mut s)
        .iter()
        .map(|f| f["ref"].as_u64().unwrap())
        .collect();
    assert_eq!(pongs, vec![1, 3]);
    // A batch with one bad op is refused whole.
    text(
        &mut s,
        r#"[{"op":"append","ref":5,"conv":"a","body":1},{"op":"append","ref":6}]"#,
    );
    assert!(requests(&mut s).is_empty());
    assert_eq!(codes(&frames(&mut s)), vec!["bad_request"]);
}

#[test]
fn ops_sent_before_welcome_are_forwarded_after_it_in_order() {
    // Proves pipelining right after hello: early ops wait for welcome, then go in order, and
    // an early ping is answered after the welcome frame.
    let mut s = session();
    text(
        &mut s,
        r#"[{"op":"hello","mesh":"m","peer":"p","token":"t"},{"op":"append","ref":1,"conv":"c","body":1},{"op":"ping","ref":2},{"op":"ack","upto":3}]"#,
    );
    assert!(matches!(
        &requests(&mut s)[..],
        [(_, ShardOp::Hello { .. })]
    ));
    assert!(frames(&mut s).is_empty(), "nothing answered before welcome");
    s.handle_reply(NOW, 0, welcome_reply());
    let reqs = requests(&mut s);
    assert!(
        matches!(
            &reqs[..],
            [
                (Route::ByKey, ShardOp::Append { r: 1, from, .. }),
                (Route::ByKey, ShardOp::Ack { upto: 3, .. })
            ] if &**from == "p"
        ),
        "{reqs:?}"
    );
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["op"].as_str(), f[1]["op"].as_str()),
        (Some("welcome"), Some("pong"))
    );
    assert_eq!(s.inflight(), 1);
}

#[test]
fn ops_held_before_welcome_count_against_the_inflight_limit() {
    // Proves held ops turn wants_read off at the limit, and back on once welcome releases them
    // and their answers come back.
    let mut s = session_with(SessionConfig {
        inflight_requests_max: 2,
        ..SessionConfig::default()
    });
    hello(&mut s);
    assert!(s.wants_read());
    append(&mut s, 1);
    assert!(s.wants_read());
    append(&mut s, 2);
    assert!(!s.wants_read());
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(requests(&mut s).len(), 2);
    assert!(!s.wants_read(), "now in flight");
    s.handle_reply(NOW, 0, ok(1));
    assert!(s.wants_read());
}

#[test]
fn pushes_return_credit_per_shard_when_flushed() {
    // Proves each shard gets back exactly the credit its pushed frames used, once written, in
    // shard order; answers (ok) use no credit.
    let mut s = session();
    welcome(&mut s);
    append(&mut s, 1);
    requests(&mut s);
    s.handle_reply(NOW, 2, event(1));
    s.handle_reply(NOW, 2, event(2));
    s.handle_reply(NOW, 0, deliver(1));
    s.handle_reply(NOW, 2, ok(1));
    assert_eq!(frames(&mut s).len(), 4);
    s.handle_flushed(NOW);
    assert_eq!(
        requests(&mut s),
        vec![
            (Route::Shard(0), ShardOp::Flushed { frames: 1 }),
            (Route::Shard(2), ShardOp::Flushed { frames: 2 }),
        ]
    );
    s.handle_flushed(NOW);
    assert!(requests(&mut s).is_empty(), "credit is returned once");
}

#[test]
fn only_polled_pushes_return_credit() {
    // Proves a flush returns credit for frames the glue has taken, not for frames still queued.
    let mut s = session();
    welcome(&mut s);
    s.handle_reply(NOW, 1, event(1));
    s.handle_reply(NOW, 1, event(2));
    s.handle_reply(NOW, 1, event(3));
    assert!(s.poll_transmit().is_some());
    s.handle_flushed(NOW);
    assert_eq!(
        requests(&mut s),
        vec![(Route::Shard(1), ShardOp::Flushed { frames: 1 })]
    );
    assert_eq!(frames(&mut s).len(), 2);
    s.handle_flushed(NOW);
    assert_eq!(
        requests(&mut s),
        vec![(Route::Shard(1), ShardOp::Flushed { frames: 2 })]
    );
}

#[test]
fn consecutive_acks_coalesce_into_one_request() {
    // Proves an ack flood becomes one request carrying the highest position, while acks split
    // by another request stay separate (order is kept).
    let mut s = session();
    welcome(&mut s);
    text(
        &mut s,
        r#"[{"op":"ack","upto":3},{"op":"ack","upto":7},{"op":"ack","upto":5}]"#,
    );
    append(&mut s, 1);
    text(&mut s, r#"{"op":"ack","upto":9}"#);
    let reqs: Vec<ShardOp> = requests(&mut s).into_iter().map(|(_, op)| op).collect();
    assert!(
        matches!(
            &reqs[..],
            [
                ShardOp::Ack { upto: 7, .. },
                ShardOp::Append { r: 1, .. },
                ShardOp::Ack { upto: 9, .. }
            ]
        ),
        "{reqs:?}"
    );
    // Once polled, an ack is no longer merged into.
    text(&mut s, r#"{"op":"ack","upto":10}"#);
    assert!(matches!(
        &requests(&mut s)[..],
        [(_, ShardOp::Ack { upto: 10, .. })]
    ));
}

#[test]
fn closed_is_sent_exactly_once_and_http_replies_are_ignored() {
    // Proves detaching happens once whatever closes the session, and stray replies never panic.
    let mut s = session();
    welcome(&mut s);
    s.handle_reply(
        NOW,
        0,
        Reply::Authed {
            r: 1,
            peer: "p".into(),
        },
    );
    s.handle_reply(
        NOW,
        0,
        Reply::Messages {
            r: 2,
            events: vec![],
            head: 0,
        },
    );
    s.handle_reply(NOW, 0, welcome_reply()); // a second welcome
    assert_eq!(s.stats().internal_errors, 3);
    assert!(frames(&mut s).is_empty());
    assert!(!s.is_closed());
    s.handle_shard_restarted(NOW, 0);
    assert_eq!(codes(&frames(&mut s)), vec!["unavailable"]);
    s.handle_transport_closed(NOW);
    s.handle_transport_closed(NOW);
    s.handle_timeout(NOW + 1_000_000);
    s.handle_flushed(NOW);
    let reqs = requests(&mut s);
    assert_eq!(closes(&reqs), 1);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    // After close, input is ignored.
    text(&mut s, r#"{"op":"ping","ref":1}"#);
    s.handle_reply(NOW, 0, ok(1));
    assert!(frames(&mut s).is_empty() && requests(&mut s).is_empty());
}

#[test]
fn transport_close_detaches_once_from_every_state() {
    // Proves handle_transport_closed sends Closed exactly once for a session a shard may know
    // (authenticating or open), after the requests queued before it, and none otherwise.
    let mut fresh = session();
    fresh.handle_transport_closed(NOW);
    assert!(fresh.is_closed() && requests(&mut fresh).is_empty());

    let mut authenticating = session();
    hello(&mut authenticating);
    authenticating.handle_transport_closed(NOW);
    let reqs = requests(&mut authenticating);
    assert!(matches!(&reqs[0], (Route::ByKey, ShardOp::Hello { .. })));
    assert_eq!(closes(&reqs), 1);
    assert_eq!(reqs.len(), 2);

    let mut open = session();
    welcome(&mut open);
    append(&mut open, 1);
    open.handle_transport_closed(NOW);
    open.handle_transport_closed(NOW);
    let reqs = requests(&mut open);
    assert!(matches!(&reqs[0], (Route::ByKey, ShardOp::Append { .. })));
    assert_eq!(reqs[1], (Route::AllShards, ShardOp::Closed));
    assert_eq!(reqs.len(), 2);
}

#[test]
fn a_client_that_does_not_read_is_closed_as_overloaded() {
    // Proves frames queued past pending_transmit_frames_max end the session with overloaded,
    // sent ahead of the frames the client will never read.
    let mut s = session_with(SessionConfig {
        pending_transmit_frames_max: 4,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    for r in 1..=5 {
        append(&mut s, r);
    }
    requests(&mut s);
    for r in 1..=4 {
        s.handle_reply(NOW, 0, ok(r));
    }
    assert!(!s.is_closed(), "at the limit, not past it");
    assert!(!s.wants_read(), "a full transmit queue stops reading");
    s.handle_reply(NOW, 0, ok(5));
    assert!(s.is_closed());
    let f = frames(&mut s);
    assert_eq!(codes(&f), vec!["overloaded"]);
    assert_eq!(closes(&requests(&mut s)), 1);
}

#[test]
fn batched_replies_are_accounted_frame_by_frame() {
    // Proves a shard reply carrying a batch counts its answers and pushes like single frames,
    // and a nested batch is dropped as an internal error.
    let mut s = session();
    welcome(&mut s);
    append(&mut s, 1);
    requests(&mut s);
    let Reply::Frame(ev) = event(1) else {
        unreachable!()
    };
    s.handle_reply(
        NOW,
        3,
        Reply::Frame(ServerOp::Batch(vec![
            ServerOp::Ok {
                r: 1,
                pos: None,
                seq: Some(1),
            },
            ev,
            ServerOp::Batch(vec![]),
        ])),
    );
    assert_eq!(s.inflight(), 0);
    assert_eq!(s.stats().internal_errors, 1);
    assert_eq!(frames(&mut s).len(), 2);
    s.handle_flushed(NOW);
    assert_eq!(
        requests(&mut s),
        vec![(Route::Shard(3), ShardOp::Flushed { frames: 1 })]
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // Proves garbage in any state (before hello, authenticating, open) yields error frames,
    // never a panic, and every JSON frame the session sends parses.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift64*: a fixed, dependency-free byte source.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for round in 0..300u64 {
        let mut s = session();
        if round % 3 >= 1 {
            hello(&mut s);
        }
        if round % 3 == 2 {
            s.handle_reply(NOW, 0, welcome_reply());
        }
        for _ in 0..5 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && !bytes.is_empty() {
                bytes[0] = b'['; // steer some frames into the JSON batch path
            }
            s.handle_frame(
                NOW,
                InFrame {
                    binary: round % 4 == 1,
                    bytes: &bytes,
                },
            );
        }
        while let Some(f) = s.poll_transmit() {
            if !f.binary {
                let _: serde_json::Value = serde_json::from_slice(&f.bytes).unwrap();
            }
        }
        requests(&mut s);
    }
}

#[test]
fn an_oversize_length_prefix_gets_too_large_and_the_session_goes_on() {
    // Proves a stream transport can refuse a frame by its length prefix alone (without
    // reading it into memory): the client gets too_large and the session keeps serving.
    let mut s = session();
    welcome(&mut s);
    s.handle_oversize_frame(NOW, 10 << 20);
    assert_eq!(codes(&frames(&mut s)), vec!["too_large"]);
    assert!(!s.is_closed() && s.wants_read());
    text(&mut s, r#"{"op":"ping","ref":1}"#);
    assert_eq!(
        requests(&mut s).len(),
        0,
        "ping is answered by the session itself"
    );
    assert_eq!(frames(&mut s)[0]["op"], "pong");
}

#[test]
fn conversation_events_name_their_conversation_for_stream_transports() {
    // Proves the routing hint QUIC uses: event frames carry their conversation, every other
    // frame none (so it goes on the control stream).
    let mut s = session();
    welcome(&mut s);
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Event(DeliveredEvent {
            conv: "standup".into(),
            seq: 1,
            from: "p".into(),
            body: Body::from_trusted("{}".into()),
            ts: 1,
        })),
    );
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Ok {
            r: 1,
            pos: Some(1),
            seq: None,
        }),
    );
    let event = s.poll_transmit().expect("the event");
    assert_eq!(event.conv.as_deref(), Some("standup"));
    let ok = s.poll_transmit().expect("the ok");
    assert_eq!(ok.conv, None);
}

// ---------------------------------------------------------------------------------------------
// Key hellos (challenge, then a signed hello)
// ---------------------------------------------------------------------------------------------

fn signed_hello(s: &mut Session, nonce_hex_in_frame: Option<&str>) {
    // A client cannot name the nonce: any "nonce" field it adds is ignored.
    let extra = nonce_hex_in_frame.map_or(String::new(), |n| format!(r#","nonce":"{n}""#));
    text(
        s,
        &format!(
            r#"{{"op":"hello","mesh":"m","peer":"p","sig":"{}","ts":5{extra}}}"#,
            "cd".repeat(64)
        ),
    );
}

#[test]
fn the_nonce_the_glue_set_is_issued_and_forwarded_with_the_signature() {
    // Proves challenge answers the glue's nonce, and the signed hello forwards that nonce (not
    // one the client put in its frame) with the client's sig and ts.
    let mut s = session();
    s.set_challenge_nonce(NOW, [0x42; 32]);
    s.set_challenge_nonce(NOW, [0x43; 32]);
    text(&mut s, r#"{"op":"challenge"}"#);
    let f = frames(&mut s);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["op"], "challenge");
    assert_eq!(f[0]["nonce"], "42".repeat(32), "the first nonce set stays");
    signed_hello(&mut s, Some(&"99".repeat(32)));
    match &requests(&mut s)[..] {
        [(
            Route::ByKey,
            ShardOp::Hello {
                mesh,
                peer,
                token,
                proof: Some(proof),
            },
        )] => {
            assert_eq!((&**mesh, &**peer, token.as_str()), ("m", "p", ""));
            assert_eq!(proof.nonce, [0x42; 32]);
            assert_eq!(proof.sig, vec![0xcd; 64]);
            assert_eq!(proof.ts, 5);
        }
        other => panic!("{other:?}"),
    }
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(frames(&mut s)[0]["op"], "welcome");
    // The nonce is spent: another signed hello is refused as unauthorized.
    signed_hello(&mut s, None);
    assert_eq!(codes(&frames(&mut s)), vec!["unauthorized"]);
    assert!(requests(&mut s).is_empty());
}

#[test]
fn challenge_without_a_nonce_errors_and_a_token_hello_still_works() {
    // Proves a session the glue gave no nonce answers challenge with a clear error (and stays
    // open for a token hello).
    let mut s = session();
    text(&mut s, r#"{"op":"challenge"}"#);
    let f = frames(&mut s);
    assert_eq!(codes(&f), vec!["unavailable"]);
    assert!(f[0]["message"]
        .as_str()
        .unwrap()
        .contains("no challenge nonce"));
    assert!(!s.is_closed());
    welcome(&mut s);
    assert!(s.identity().is_some());
}

#[test]
fn a_signed_hello_without_a_challenge_is_refused_and_closes() {
    // Proves a signed hello on a session that issued no challenge (none asked for, or none
    // set) is unauthorized and ends the session without reaching a shard.
    for set_nonce in [false, true] {
        let mut s = session();
        if set_nonce {
            s.set_challenge_nonce(NOW, [1; 32]);
        }
        signed_hello(&mut s, None);
        let f = frames(&mut s);
        assert_eq!(codes(&f), vec!["unauthorized"]);
        assert!(f[0]["message"].as_str().unwrap().contains("no challenge"));
        assert!(s.is_closed());
        assert!(requests(&mut s).is_empty(), "no shard heard of it");
    }
}

/// Every queued frame as (its ops, the stream it is for), batches flattened.
fn batched_frames(s: &mut Session) -> Vec<(Vec<ServerOp>, Option<Arc<str>>)> {
    let mut out = Vec::new();
    while let Some(f) = s.poll_transmit() {
        let ops = if f.binary {
            codec::decode_server_binary(&f.bytes).expect("a valid binary frame")
        } else {
            codec::decode_server_json(&f.bytes).expect("a valid JSON frame")
        };
        out.push((ops, f.conv));
    }
    out
}

#[test]
fn options_batch_joins_queued_frames_per_stream_in_order() {
    // Proves `options` with `batch`: answered with ok (before hello too), after which queued
    // server ops go out joined, in order, at most `batch` per frame, never mixing a
    // conversation's events with control-stream frames.
    let mut s = session();
    text(
        &mut s,
        r#"[{"op":"options","ref":1,"batch":3},{"op":"hello","mesh":"m","peer":"p","token":"t"}]"#,
    );
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    let first = batched_frames(&mut s);
    assert_eq!(first.len(), 1, "the ok and the welcome share one frame");
    assert!(matches!(
        first[0].0[..],
        [ServerOp::Ok { r: 1, .. }, ServerOp::Welcome { .. }]
    ));
    for r in 10..15 {
        append(&mut s, r);
    }
    requests(&mut s);
    for r in 10..13 {
        s.handle_reply(NOW, 0, ok(r));
    }
    s.handle_reply(NOW, 0, event(1));
    s.handle_reply(NOW, 0, event(2));
    s.handle_reply(NOW, 0, ok(13));
    s.handle_reply(NOW, 0, ok(14));
    let got: Vec<(Vec<String>, bool)> = batched_frames(&mut s)
        .into_iter()
        .map(|(ops, conv)| {
            let names = ops
                .iter()
                .map(|o| match o {
                    ServerOp::Ok { r, .. } => format!("ok{r}"),
                    ServerOp::Event(e) => format!("event{}", e.seq),
                    other => other.name().to_string(),
                })
                .collect();
            (names, conv.is_some())
        })
        .collect();
    let expect = |names: &[&str], conv: bool| (names.iter().map(|n| n.to_string()).collect(), conv);
    assert_eq!(
        got,
        vec![
            expect(&["ok10", "ok11", "ok12"], false),
            expect(&["event1", "event2"], true),
            expect(&["ok13", "ok14"], false),
        ]
    );
}

#[test]
fn batched_pushes_still_return_credit_per_op() {
    // Proves push credit counts each delivery inside a batch frame, so a batching client
    // returns exactly the credit it spent (binary session, one frame of four deliveries).
    let mut s = session();
    binary(&mut s, &ClientOp::Options { r: 1, batch: 64 });
    binary_hello(&mut s);
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    batched_frames(&mut s);
    s.handle_flushed(NOW);
    requests(&mut s);
    for pos in 1..=4 {
        s.handle_reply(NOW, 1, deliver(pos));
    }
    let frames = batched_frames(&mut s);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0.len(), 4);
    assert_eq!(s.stats().ops_out, 6, "ok, welcome and four deliveries");
    s.handle_flushed(NOW);
    assert!(matches!(
        &requests(&mut s)[..],
        [(Route::Shard(1), ShardOp::Flushed { frames: 4 })]
    ));
}

#[test]
fn batches_stay_within_the_node_cap_and_the_frame_size_limit() {
    // Proves the two bounds on a batch frame: the node's out_batch_ops_max caps a larger
    // client ask, and a batch closes before it would pass frame_bytes_max.
    let mut s = session_with(SessionConfig {
        out_batch_ops_max: 4,
        frame_bytes_max: 4096,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    text(&mut s, r#"{"op":"options","ref":1,"batch":1000}"#);
    batched_frames(&mut s);
    for pos in 1..=10 {
        s.handle_reply(NOW, 0, deliver(pos));
    }
    let sizes: Vec<usize> = batched_frames(&mut s)
        .iter()
        .map(|(ops, _)| ops.len())
        .collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let mut s = session_with(SessionConfig {
        frame_bytes_max: 4096,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    text(&mut s, r#"{"op":"options","ref":1,"batch":1000}"#);
    batched_frames(&mut s);
    let big = Body::from_json_text(format!("\"{}\"", "x".repeat(1500))).unwrap();
    for pos in 1..=5 {
        s.handle_reply(
            NOW,
            0,
            Reply::Frame(ServerOp::Deliver {
                pos,
                from: "q".into(),
                to: Target::All,
                body: big.clone(),
                ts: 1,
            }),
        );
    }
    let mut total = 0;
    while let Some(f) = s.poll_transmit() {
        assert!(f.bytes.len() <= 4096, "a batch of {} bytes", f.bytes.len());
        total += codec::decode_server_json(&f.bytes).unwrap().len();
    }
    assert_eq!(total, 5);
}

// ---------------------------------------------------------------------------------------------
// Hostile or broken clients: limits before hello, bodies, subscriptions, liveness
// ---------------------------------------------------------------------------------------------

fn is_closed_with(s: &mut Session, code: &str) -> bool {
    let f = frames(s);
    s.is_closed()
        && f.last()
            .is_some_and(|v| v["code"] == code && v.get("ref").is_none())
}

#[test]
fn a_session_that_never_says_hello_is_answered_only_so_much() {
    // Proves prehello_frames_max bounds the frames answered before hello (bad frames and
    // oversize ones count), and prehello_answers_max bounds the answers one batch frame can
    // draw (1024 options before hello): either closes the session as unauthorized.
    let mut s = session_with(SessionConfig {
        prehello_frames_max: 3,
        frame_bytes_max: 1024,
        ..SessionConfig::default()
    });
    text(&mut s, "{not json");
    s.handle_oversize_frame(NOW, 1 << 20);
    text(&mut s, &"x".repeat(2000));
    assert_eq!(
        codes(&frames(&mut s)),
        ["bad_request", "too_large", "too_large"]
    );
    assert!(!s.is_closed(), "3 frames are allowed");
    text(&mut s, r#"{"op":"challenge"}"#);
    assert!(is_closed_with(&mut s, "unauthorized"));
    assert_eq!(s.stats().prehello_limited, 1);

    let mut s = session();
    let batch: Vec<String> = (0..1024)
        .map(|r| format!(r#"{{"op":"options","ref":{r},"batch":1}}"#))
        .collect();
    text(&mut s, &format!("[{}]", batch.join(",")));
    let f = frames(&mut s);
    assert!(s.is_closed());
    assert_eq!(
        f.len(),
        66,
        "64 answers, the one past the limit, then the refusal"
    );
    assert_eq!(f[65]["code"], "unauthorized");
    assert!(requests(&mut s).is_empty(), "no shard ever heard of it");
}

#[test]
fn a_hello_inside_the_limits_is_unaffected_and_open_sessions_are_not_counted() {
    // Proves the pre-hello limits leave a normal session alone: options and a hello in one
    // frame, then many frames and answers after welcome.
    let mut s = session_with(SessionConfig {
        prehello_frames_max: 1,
        prehello_answers_max: 1,
        ..SessionConfig::default()
    });
    text(
        &mut s,
        r#"[{"op":"options","ref":0,"batch":1},{"op":"hello","mesh":"m","peer":"p","token":"t"}]"#,
    );
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    assert_eq!(frames(&mut s).len(), 2);
    for r in 0..10 {
        text(&mut s, &format!(r#"{{"op":"ping","ref":{r}}}"#));
    }
    assert_eq!(frames(&mut s).len(), 10);
    assert!(!s.is_closed());
}

#[test]
fn challenge_after_any_hello_is_unauthorized_and_the_session_stays_open() {
    // Proves `challenge` after the nonce was used answers the documented `unauthorized`
    // ("already used"), after a token hello too, while authenticating and once open.
    let mut s = session();
    s.set_challenge_nonce(NOW, [1; 32]);
    hello(&mut s);
    text(&mut s, r#"{"op":"challenge"}"#);
    let f = frames(&mut s);
    assert_eq!(f[0]["code"], "unauthorized", "{f:?}");
    assert!(f[0]["message"].as_str().unwrap().contains("already used"));
    requests(&mut s);
    s.handle_reply(NOW, 0, welcome_reply());
    frames(&mut s);
    text(&mut s, r#"{"op":"challenge"}"#);
    let f = frames(&mut s);
    assert_eq!(f[0]["code"], "unauthorized");
    assert!(!s.is_closed());
}

#[test]
fn bodies_over_body_bytes_max_are_too_large_for_their_request_only() {
    // Proves a body of exactly body_bytes_max is forwarded and one byte more is refused with
    // too_large and the request's ref, taking no in-flight slot; the session stays open.
    let mut s = session_with(SessionConfig {
        body_bytes_max: 100,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    let body = |n: usize| format!("\"{}\"", "a".repeat(n - 2));
    text(
        &mut s,
        &format!(r#"{{"op":"send","ref":1,"to":"*","body":{}}}"#, body(100)),
    );
    assert_eq!(requests(&mut s).len(), 1);
    text(
        &mut s,
        &format!(
            r#"{{"op":"append","ref":2,"conv":"c","body":{}}}"#,
            body(101)
        ),
    );
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["code"].clone(), f[0]["ref"].clone()),
        ("too_large".into(), 2.into())
    );
    assert!(requests(&mut s).is_empty());
    assert_eq!(s.inflight(), 1);
    assert!(!s.is_closed());
}

#[test]
fn subscriptions_are_bounded_per_session() {
    // Proves subscriptions_max: distinct conversations count once, one more is too_large with
    // its ref, and unsubscribing frees a place.
    let mut s = session_with(SessionConfig {
        subscriptions_max: 2,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    let sub = |s: &mut Session, r: u64, c: &str| {
        text(
            s,
            &format!(r#"{{"op":"subscribe","ref":{r},"conv":"{c}"}}"#),
        )
    };
    sub(&mut s, 1, "a");
    sub(&mut s, 2, "b");
    sub(&mut s, 3, "a");
    assert_eq!(
        requests(&mut s).len(),
        3,
        "a again restarts it, no new place"
    );
    sub(&mut s, 4, "c");
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["code"].clone(), f[0]["ref"].clone()),
        ("too_large".into(), 4.into())
    );
    assert!(f[0]["message"]
        .as_str()
        .unwrap()
        .contains("session_subscriptions_max"));
    assert!(requests(&mut s).is_empty());
    text(&mut s, r#"{"op":"unsubscribe","ref":5,"conv":"a"}"#);
    sub(&mut s, 6, "c");
    assert_eq!(requests(&mut s).len(), 2);
    assert_eq!(s.stats().subscriptions_refused, 1);
}

fn deliver_body(pos: u64, body: &'static [u8]) -> Reply {
    Reply::Frame(ServerOp::Deliver {
        pos,
        from: "q".into(),
        to: Target::All,
        body: Body::from_trusted(bytes::Bytes::from_static(body)),
        ts: 1,
    })
}

#[test]
fn a_push_a_session_cannot_encode_is_an_error_in_its_place_never_a_gap() {
    // Proves a stored body that is not UTF-8 (written before bodies were checked) reaches a
    // JSON client as an error naming its pos, in order between its neighbours, with its push
    // credit returned; a binary client gets the body as it is; a frame over frame_bytes_max
    // becomes a too_large error. Every frame sent is valid JSON.
    let mut s = session();
    welcome(&mut s);
    s.handle_reply(NOW, 0, deliver(1));
    s.handle_reply(NOW, 0, deliver_body(2, b"\"\xff\""));
    s.handle_reply(NOW, 0, deliver(3));
    let f = frames(&mut s);
    assert_eq!(f[0]["pos"], 1);
    assert_eq!(f[1]["code"], "internal");
    assert!(f[1]["message"].as_str().unwrap().contains("pos 2"), "{f:?}");
    assert_eq!(f[2]["pos"], 3);
    s.handle_flushed(NOW);
    assert_eq!(
        requests(&mut s),
        vec![(Route::Shard(0), ShardOp::Flushed { frames: 3 })]
    );
    assert_eq!(s.stats().unencodable_pushes, 1);

    let mut b = session();
    binary_hello(&mut b);
    requests(&mut b);
    b.handle_reply(NOW, 0, welcome_reply());
    b.poll_transmit();
    b.handle_reply(NOW, 0, deliver_body(2, b"\"\xff\""));
    let f = b.poll_transmit().unwrap();
    match &codec::decode_server_binary(&f.bytes).unwrap()[..] {
        [ServerOp::Deliver { body, .. }] => assert_eq!(&body.0[..], b"\"\xff\""),
        other => panic!("{other:?}"),
    }

    let mut s = session_with(SessionConfig {
        frame_bytes_max: 200,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    s.handle_reply(NOW, 0, deliver_body(4, &[b'1'; 300]));
    let f = frames(&mut s);
    assert_eq!(f[0]["code"], "too_large");
    assert!(f[0]["message"].as_str().unwrap().contains("pos 4"));
}

#[test]
fn pings_are_due_every_interval_and_a_late_pong_closes() {
    // Proves the ping timer: due 30 s after the start, taken once by the glue, answered by
    // any pong (the next one then 30 s after the last went out); a pong 30 s late closes the
    // session as overloaded and tells the shards.
    let mut s = session();
    welcome(&mut s);
    assert_eq!(s.poll_timeout(), Some(NOW + 30_000));
    s.handle_timeout(NOW + 29_999);
    assert_eq!(s.poll_ping(NOW + 29_999), None, "not due yet");
    s.handle_timeout(NOW + 30_000);
    assert_eq!(
        s.poll_timeout(),
        None,
        "due: waiting for the glue to take it"
    );
    assert_eq!(s.poll_ping(NOW + 30_001), Some(1));
    assert_eq!(s.poll_ping(NOW + 30_001), None, "once");
    assert_eq!(s.poll_timeout(), Some(NOW + 60_001), "the pong deadline");
    s.handle_pong(NOW + 30_050);
    assert_eq!(
        s.poll_timeout(),
        Some(NOW + 60_001),
        "next ping: 30 s after the last"
    );
    s.handle_timeout(NOW + 60_001);
    assert_eq!(s.poll_ping(NOW + 60_001), Some(2));
    s.handle_timeout(NOW + 90_000);
    assert!(!s.is_closed(), "the pong is not late yet");
    s.handle_timeout(NOW + 90_001);
    assert!(is_closed_with(&mut s, "overloaded"));
    assert_eq!(closes(&requests(&mut s)), 1);
    assert_eq!(s.stats().pongs_late, 1);
}

#[test]
fn a_live_idle_session_is_never_closed() {
    // Proves a client that only answers pings (what a WebSocket library does by itself)
    // stays open for a simulated day, through pings every 30 s.
    let mut s = session();
    welcome(&mut s);
    let mut now = NOW;
    for _ in 0..3000 {
        now = s.poll_timeout().expect("a ping is always scheduled");
        s.handle_timeout(now);
        assert!(s.poll_ping(now).is_some());
        s.handle_pong(now + 20);
    }
    assert!(now >= NOW + 3000 * 30_000);
    assert!(!s.is_closed() && frames(&mut s).is_empty());
    assert_eq!(s.stats().pings_sent, 3000);
}

#[test]
fn a_late_pong_waits_while_the_node_is_not_reading_or_writing() {
    // Proves the pong deadline is extended, not fatal, while the node stopped reading (the
    // in-flight limit: the pong is behind unread frames) or a write is under way (bounded by
    // the write deadline instead).
    let mut s = session_with(SessionConfig {
        inflight_requests_max: 1,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    s.handle_timeout(NOW + 30_000);
    s.poll_ping(NOW + 30_000).unwrap();
    append(&mut s, 1);
    assert!(!s.wants_read());
    s.handle_timeout(NOW + 60_000);
    assert!(!s.is_closed(), "not reading: the pong cannot be seen");
    s.handle_reply(NOW, 0, ok(1));
    frames(&mut s);
    s.handle_writing(NOW + 70_000, None);
    s.handle_timeout(NOW + 90_000);
    assert!(!s.is_closed(), "writing: the write deadline guards it");
    s.handle_flushed(NOW + 90_000);
    s.handle_timeout(NOW + 120_000);
    assert!(is_closed_with(&mut s, "overloaded"));
}

#[test]
fn a_write_without_progress_abandons_the_session() {
    // Proves the write deadline: progress moves it, a flush clears it, and a write stuck for
    // write_timeout_ms closes the session, drops its queued frames, tells the shards, and
    // tells the glue to abandon the transport.
    let mut s = session();
    welcome(&mut s);
    s.handle_writing(NOW, None);
    assert_eq!(s.poll_timeout(), Some(NOW + 30_000));
    s.handle_writing(NOW + 20_000, None);
    s.handle_timeout(NOW + 30_000);
    assert!(!s.is_closed(), "progress at 20 s moved the deadline");
    s.handle_flushed(NOW + 30_000);
    assert_eq!(
        s.poll_timeout(),
        None,
        "no write deadline; the due ping waits for the glue"
    );
    s.handle_writing(NOW + 31_000, None);
    s.handle_reply(NOW, 0, deliver(1));
    s.handle_timeout(NOW + 61_000);
    assert!(s.is_closed() && s.is_write_abandoned());
    assert!(s.poll_transmit().is_none(), "nothing more is written");
    assert_eq!(closes(&requests(&mut s)), 1);
    assert_eq!(s.stats().writes_timed_out, 1);
}

#[test]
fn the_hello_timeout_fires_while_a_write_is_stuck() {
    // Proves the hello deadline does not wait for writes (20 silent pre-hello connections that
    // never read held their memory for 30 s+): it closes the session at 10 s, and the final
    // error frame's write stays bounded by the write deadline after the close.
    let mut s = session();
    text(&mut s, r#"{"op":"challenge"}"#);
    s.poll_transmit();
    s.handle_writing(NOW + 1, None);
    assert_eq!(s.poll_timeout(), Some(NOW + 10_000));
    s.handle_timeout(NOW + 10_000);
    assert!(s.is_closed());
    assert_eq!(
        s.poll_timeout(),
        Some(NOW + 30_001),
        "the write deadline outlives the close"
    );
    s.handle_timeout(NOW + 30_001);
    assert!(s.is_write_abandoned());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_stuck_subscription_stream_closes_the_session_with_a_reason() {
    // Proves a stream transport's per-stream deadline: a conversation stream without progress
    // closes the session with overloaded naming the conversation, on the main stream (which
    // still works, so the transport is not abandoned); a stream written out clears its own.
    let mut s = session();
    welcome(&mut s);
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    s.handle_writing(NOW, Some(&a));
    s.handle_writing(NOW + 5, Some(&b));
    s.handle_stream_written(NOW + 10, &a);
    s.handle_timeout(NOW + 30_004);
    assert!(!s.is_closed(), "a was written out");
    s.handle_timeout(NOW + 30_005);
    let f = frames(&mut s);
    assert!(s.is_closed() && !s.is_write_abandoned());
    assert_eq!(f[0]["code"], "overloaded");
    assert!(f[0]["message"].as_str().unwrap().contains("conversation b"));
}

#[test]
fn credit_of_frames_a_stream_could_not_take_returns_when_written() {
    // Proves handle_flushed_holding: conversation frames carry their shard's credit, credit
    // held by a stream transport is not returned at the flush, and comes back when released.
    let mut s = session();
    welcome(&mut s);
    s.handle_reply(NOW, 3, event(1));
    s.handle_reply(NOW, 3, event(2));
    s.handle_reply(NOW, 0, deliver(1));
    let e1 = s.poll_transmit().unwrap();
    assert_eq!(e1.credit, Some((3, 1)));
    s.poll_transmit().unwrap();
    assert_eq!(
        s.poll_transmit().unwrap().credit,
        None,
        "a deliver: control stream"
    );
    s.handle_flushed_holding(NOW, &[(3, 1)]);
    assert_eq!(
        requests(&mut s),
        vec![
            (Route::Shard(0), ShardOp::Flushed { frames: 1 }),
            (Route::Shard(3), ShardOp::Flushed { frames: 1 }),
        ]
    );
    s.handle_credit_released(NOW, 3, 1);
    assert_eq!(
        requests(&mut s),
        vec![(Route::Shard(3), ShardOp::Flushed { frames: 1 })]
    );
    // A batch frame of one conversation carries the credit of all its events.
    s.handle_reply(
        NOW,
        3,
        Reply::Frame(ServerOp::Ok {
            r: 9,
            pos: None,
            seq: None,
        }),
    );
    text(&mut s, r#"{"op":"options","ref":9,"batch":8}"#);
    frames(&mut s);
    s.handle_reply(NOW, 3, event(3));
    s.handle_reply(NOW, 3, event(4));
    assert_eq!(s.poll_transmit().unwrap().credit, Some((3, 2)));
}

#[test]
fn a_shard_that_cannot_queue_replies_closes_the_session() {
    // Proves the zombie fix's core half: when a shard could not queue replies for the session
    // it is closed with overloaded and every shard is told, never silently kept open.
    let mut s = session();
    welcome(&mut s);
    s.handle_shard_overloaded(NOW, 2);
    assert!(is_closed_with(&mut s, "overloaded"));
    assert_eq!(closes(&requests(&mut s)), 1);
}

#[test]
fn a_send_key_travels_to_the_shard_and_a_bad_one_is_refused_first() {
    // Proves `send` carries its idempotency key to the shard as the sender's, and that a key
    // breaking the rules (empty, over 128 bytes) is refused before anything is forwarded.
    let mut s = session();
    welcome(&mut s);
    text(
        &mut s,
        r#"{"op":"send","ref":1,"to":"q","body":1,"key":"s-1"}"#,
    );
    match &requests(&mut s)[..] {
        [(
            _,
            ShardOp::Send {
                r: 1,
                from,
                key: Some(k),
                ..
            },
        )] => {
            assert_eq!((&**from, &**k), ("p", "s-1"));
        }
        other => panic!("{other:?}"),
    }
    let long = "k".repeat(129);
    for key in ["", long.as_str()] {
        text(
            &mut s,
            &format!(r#"{{"op":"send","ref":2,"to":"q","body":1,"key":"{key}"}}"#),
        );
        assert!(requests(&mut s).is_empty(), "refused before forwarding");
        let f = frames(&mut s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0]["op"], "error");
    }
}

#[test]
fn a_request_without_an_answer_is_answered_unavailable_at_request_timeout() {
    // Proves the request deadline: a shard that never answers (no quorum, unreachable leader)
    // leaves no request waiting past `request_timeout_ms`: the session answers `unavailable`
    // with the ref at the deadline, not before, stays open, drops the shard's late answer, and
    // keeps the request in flight until that answer comes.
    let mut s = session_with(SessionConfig {
        request_timeout_ms: 5_000,
        ..SessionConfig::default()
    });
    welcome(&mut s);
    append(&mut s, 1);
    assert_eq!(requests(&mut s).len(), 1);
    assert_eq!(
        s.poll_timeout(),
        Some(NOW + 5_000),
        "the request's deadline"
    );
    s.handle_timeout(NOW + 4_999);
    assert!(frames(&mut s).is_empty(), "not before the deadline");
    s.handle_timeout(NOW + 5_000);
    let f = frames(&mut s);
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0]["ref"].as_u64(), f[0]["code"].as_str()),
        (Some(1), Some("unavailable"))
    );
    assert!(!s.is_closed(), "the session stays open");
    assert_eq!(s.inflight(), 1, "counted until its shard answers");
    assert_eq!(s.stats().requests_timed_out, 1);
    s.handle_reply(NOW + 6_000, 0, ok(1));
    assert!(frames(&mut s).is_empty(), "the late answer is dropped");
    assert_eq!(s.inflight(), 0);
    assert_eq!(s.stats().requests_answered_late, 1);
    // A request answered in time gets its shard's answer and no deadline error.
    append(&mut s, 2);
    requests(&mut s);
    s.handle_reply(NOW + 7_000, 0, ok(2));
    s.handle_timeout(NOW + 20_000);
    let f = frames(&mut s);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["op"], "ok");
    assert_eq!(s.stats().requests_answered, 2, "one answer per request");
}

mod reattach;
