//! Session core tests: an in-memory driver plays the glue and the shards.

use super::*;
use fabric_proto::{Body, DeliveredEvent, Target};

const NOW: u64 = 1_000_000;

fn session() -> Session {
    Session::new(7, NOW, SessionConfig::default())
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

fn frames(s: &mut Session) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Some(f) = s.poll_transmit() {
        assert!(!f.binary);
        out.push(serde_json::from_slice(&f.bytes).unwrap());
    }
    out
}

fn requests(s: &mut Session) -> Vec<(Route, ShardOp)> {
    let mut out = Vec::new();
    while let Some((route, req)) = s.poll_request() {
        assert_eq!(req.session, 7);
        out.push((route, req.op));
    }
    out
}

fn welcome(s: &mut Session) {
    text(s, r#"{"op":"hello","mesh":"m","peer":"p","token":"t"}"#);
    let reqs = requests(s);
    assert!(matches!(&reqs[..], [(Route::ByKey, ShardOp::Hello { .. })]));
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Welcome {
            session: 7,
            acked: 0,
            head: 0,
        }),
    );
    assert_eq!(frames(s)[0]["op"], "welcome");
}

fn ok(r: u64) -> Reply {
    Reply::Frame(ServerOp::Ok {
        r,
        pos: Some(r),
        seq: None,
    })
}

#[test]
fn hello_welcome_send_ok() {
    // Proves the happy path: hello is forwarded, welcome opens, send carries mesh and peer.
    let mut s = session();
    welcome(&mut s);
    assert_eq!(
        s.identity().map(|(m, p)| (m.to_string(), p.to_string())),
        Some(("m".into(), "p".into()))
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
}

#[test]
fn inflight_limit_turns_reading_off_and_acks_turn_it_on() {
    // Proves backpressure: at the in-flight limit wants_read is false until acks arrive.
    let mut s = Session::new(
        7,
        NOW,
        SessionConfig {
            inflight_requests_max: 3,
            ..SessionConfig::default()
        },
    );
    welcome(&mut s);
    for r in 1..=3 {
        assert!(s.wants_read());
        text(
            &mut s,
            &format!(r#"{{"op":"append","ref":{r},"conv":"c","body":1}}"#),
        );
    }
    assert!(!s.wants_read());
    s.handle_reply(NOW, 0, ok(2)); // acks may come in any order
    assert!(s.wants_read());
}

#[test]
fn ops_before_hello_are_refused_and_close() {
    // Proves an op before hello gets unauthorized, the session closes, and no request leaks.
    let mut s = session();
    text(&mut s, r#"{"op":"send","ref":4,"to":"q","body":1}"#);
    let f = frames(&mut s);
    assert_eq!(
        (f[0]["code"].as_str(), f[0]["ref"].as_u64()),
        (Some("unauthorized"), Some(4))
    );
    assert!(s.is_closed());
    assert!(
        requests(&mut s).is_empty(),
        "never attached, so no Closed either"
    );
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
            ProtoError::new(ErrorCode::Unauthorized, "no"),
        )),
    );
    assert_eq!(frames(&mut s)[0]["code"], "unauthorized");
    assert!(s.is_closed());
    assert!(matches!(
        &requests(&mut s)[..],
        [(Route::AllShards, ShardOp::Closed)]
    ));
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
    assert_eq!(frames(&mut s)[0]["message"], "hello timed out");
}

#[test]
fn oversize_and_malformed_frames_get_errors_and_the_session_stays_open() {
    // Proves too_large and bad_request leave the session usable, and a second hello is refused.
    let mut s = Session::new(
        7,
        NOW,
        SessionConfig {
            frame_bytes_max: 64,
            ..SessionConfig::default()
        },
    );
    welcome(&mut s);
    text(
        &mut s,
        &format!(r#"{{"op":"ping","ref":1,"pad":"{}"}}"#, "x".repeat(100)),
    );
    text(&mut s, "{oops");
    text(
        &mut s,
        r#"{"op":"hello","mesh":"m","peer":"p","token":"t"}"#,
    );
    text(&mut s, r#"{"op":"ping","ref":2}"#);
    let f = frames(&mut s);
    let codes: Vec<_> = f
        .iter()
        .map(|v| v["code"].as_str().unwrap_or("-").to_string())
        .collect();
    assert_eq!(codes, vec!["too_large", "bad_request", "bad_request", "-"]);
    assert_eq!(f[3], serde_json::json!({"op":"pong","ref":2}));
    assert!(!s.is_closed());
}

#[test]
fn binary_sessions_get_binary_replies_and_batches_work() {
    // Proves the first frame picks the encoding, and a batch frame yields every op in order.
    let mut s = session();
    let hello = ClientOp::Hello {
        mesh: "m".into(),
        peer: "p".into(),
        token: "t".into(),
    };
    s.handle_frame(
        NOW,
        InFrame {
            binary: true,
            bytes: &codec::encode_client_binary(&hello),
        },
    );
    requests(&mut s);
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Welcome {
            session: 7,
            acked: 0,
            head: 0,
        }),
    );
    let f = s.poll_transmit().unwrap();
    assert!(f.binary);
    assert!(matches!(
        codec::decode_server_binary(&f.bytes).unwrap()[..],
        [ServerOp::Welcome { .. }]
    ));
    let batch = ClientOp::Batch(vec![
        ClientOp::Ping { r: 1 },
        ClientOp::Append {
            r: 2,
            conv: "c".into(),
            body: Body::from_json_text("1").unwrap(),
            key: None,
        },
    ]);
    s.handle_frame(
        NOW,
        InFrame {
            binary: true,
            bytes: &codec::encode_client_binary(&batch),
        },
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
}

#[test]
fn ops_sent_before_welcome_are_forwarded_after_it_in_order() {
    // Proves pipelining right after hello: early ops wait for welcome, then go in order.
    let mut s = session();
    text(
        &mut s,
        r#"[{"op":"hello","mesh":"m","peer":"p","token":"t"},{"op":"append","ref":1,"conv":"c","body":1},{"op":"ack","upto":3}]"#,
    );
    assert!(matches!(
        &requests(&mut s)[..],
        [(_, ShardOp::Hello { .. })]
    ));
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Welcome {
            session: 7,
            acked: 0,
            head: 0,
        }),
    );
    let reqs = requests(&mut s);
    assert!(
        matches!(
            &reqs[..],
            [
                (_, ShardOp::Append { r: 1, .. }),
                (_, ShardOp::Ack { upto: 3, .. })
            ]
        ),
        "{reqs:?}"
    );
}

#[test]
fn pushes_return_credit_per_shard_when_flushed() {
    // Proves each shard gets back exactly the credit its pushed frames used, once written.
    let mut s = session();
    welcome(&mut s);
    let ev = |seq| {
        Reply::Frame(ServerOp::Event(DeliveredEvent {
            conv: "c".into(),
            seq,
            from: "q".into(),
            body: Body::from_json_text("1").unwrap(),
            ts: 1,
        }))
    };
    s.handle_reply(NOW, 1, ev(1));
    s.handle_reply(NOW, 1, ev(2));
    s.handle_reply(
        NOW,
        0,
        Reply::Frame(ServerOp::Deliver {
            pos: 1,
            from: "q".into(),
            to: Target::All,
            body: Body::from_json_text("1").unwrap(),
            ts: 1,
        }),
    );
    assert_eq!(frames(&mut s).len(), 3);
    s.handle_flushed(NOW);
    let reqs = requests(&mut s);
    assert_eq!(
        reqs,
        vec![
            (Route::Shard(0), ShardOp::Flushed { frames: 1 }),
            (Route::Shard(1), ShardOp::Flushed { frames: 2 }),
        ]
    );
    s.handle_flushed(NOW);
    assert!(requests(&mut s).is_empty(), "credit is returned once");
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
    assert_eq!(s.stats().unexpected_replies, 1);
    s.handle_shard_restarted(NOW, 0);
    assert_eq!(frames(&mut s)[0]["code"], "unavailable");
    s.handle_transport_closed(NOW);
    s.handle_transport_closed(NOW);
    let closes = requests(&mut s)
        .into_iter()
        .filter(|(_, op)| *op == ShardOp::Closed)
        .count();
    assert_eq!(closes, 1);
}

#[test]
fn a_client_that_does_not_read_is_closed_as_overloaded() {
    // Proves frames queued past pending_transmit_frames_max end the session with overloaded.
    let mut s = Session::new(
        7,
        NOW,
        SessionConfig {
            pending_transmit_frames_max: 4,
            ..SessionConfig::default()
        },
    );
    welcome(&mut s);
    for r in 1..=5 {
        text(
            &mut s,
            &format!(r#"{{"op":"append","ref":{r},"conv":"c","body":1}}"#),
        );
    }
    for r in 1..=5 {
        s.handle_reply(NOW, 0, ok(r));
    }
    assert!(s.is_closed());
    let f = frames(&mut s);
    assert_eq!(f.last().unwrap()["code"], "overloaded");
}
