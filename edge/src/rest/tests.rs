//! The REST core: token first, the session's checks after, one answer, and `Closed` to every
//! shard that may hold the session.

use super::*;
use fabric_proto::DeliveredEvent;

const CONFIG: RestConfig = RestConfig {
    reply_timeout_ms: 1_000,
    body_bytes_max: 16,
};

fn append(conv: &str, payload: &'static [u8]) -> RestRequest {
    RestRequest {
        mesh: "m".into(),
        token: "tok".into(),
        op: RestOp::Append {
            conv: conv.into(),
            payload: Bytes::from_static(payload),
        },
    }
}

/// A page of conversation `c` from seq 1.
fn read(limit: u32, local: bool) -> RestRequest {
    RestRequest {
        mesh: "m".into(),
        token: "t".into(),
        op: RestOp::Read {
            conv: "c".into(),
            from: 1,
            limit,
            local,
        },
    }
}

fn requests(call: &mut RestCall) -> Vec<(Route, ShardOp)> {
    std::iter::from_fn(|| call.poll_request())
        .map(|(route, req)| (route, req.op))
        .collect()
}

fn authed() -> Reply {
    Reply::Authed {
        r: AUTH_REF,
        peer: "p".into(),
    }
}

fn code(answer: Option<RestAnswer>) -> ErrorCode {
    match answer {
        Some(RestAnswer::Error(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn the_token_is_checked_before_anything_the_caller_sent() {
    // Proves an unauthenticated caller learns nothing about its input: a bad conversation id
    // and bad JSON are looked at only once the token's peer is known.
    let mut call = RestCall::new(7, 0, &CONFIG, append("bad conv", b"not json"));
    let reqs = requests(&mut call);
    assert!(matches!(reqs[..], [(Route::ByKey, ShardOp::Auth { .. })]));
    let refused = ProtoError::new(ErrorCode::Unauthorized, "wrong token");
    call.handle_reply(1, 0, Reply::Frame(ServerOp::error(Some(AUTH_REF), refused)));
    assert_eq!(code(call.poll_answer()), ErrorCode::Unauthorized);

    let mut call = RestCall::new(8, 0, &CONFIG, append("bad conv", b"not json"));
    requests(&mut call);
    call.handle_reply(1, 0, authed());
    assert_eq!(code(call.poll_answer()), ErrorCode::BadRequest);
    let closes = requests(&mut call);
    assert_eq!(
        closes,
        vec![(Route::Shard(0), ShardOp::Closed)],
        "no op forwarded"
    );
}

#[test]
fn the_session_rules_apply_to_rest_bodies_keys_and_limits() {
    // Proves the same checks and codes as a WebSocket op: body over body_bytes_max, nesting,
    // a missing body, an empty key, a page limit out of range.
    let cases: [(&'static [u8], ErrorCode); 4] = [
        (br#"{"body":"0123456789abcdefghij"}"#, ErrorCode::TooLarge),
        (br#"{"key":"k"}"#, ErrorCode::BadRequest),
        (br#"{"body":1,"key":""}"#, ErrorCode::BadRequest),
        (br#"{"body":null}"#, ErrorCode::BadRequest),
    ];
    for (payload, expected) in cases {
        let mut call = RestCall::new(1, 0, &CONFIG, append("c", payload));
        requests(&mut call);
        call.handle_reply(1, 0, authed());
        assert_eq!(code(call.poll_answer()), expected, "{payload:?}");
    }
    for limit in [0, fabric_proto::READ_LIMIT_MAX + 1] {
        let mut call = RestCall::new(1, 0, &CONFIG, read(limit, false));
        requests(&mut call);
        call.handle_reply(1, 0, authed());
        assert_eq!(
            code(call.poll_answer()),
            ErrorCode::BadRequest,
            "limit {limit}"
        );
    }
    let bad_mesh = RestRequest {
        mesh: "".into(),
        ..append("c", b"{}")
    };
    let mut call = RestCall::new(1, 0, &CONFIG, bad_mesh);
    assert_eq!(code(call.poll_answer()), ErrorCode::BadRequest);
    assert!(
        requests(&mut call).is_empty(),
        "nothing sent for a bad mesh id"
    );
}

#[test]
fn an_append_is_answered_once_and_closed_on_the_shards_that_answered() {
    // Proves the op goes out as the token's peer, the seq is the answer, later replies change
    // nothing, and `Closed` goes to exactly the shards that answered.
    let mut call = RestCall::new(3, 0, &CONFIG, append("c", br#"{"body":{"a":1},"key":"k"}"#));
    requests(&mut call);
    call.handle_reply(1, 2, authed());
    let reqs = requests(&mut call);
    let [(
        Route::ByKey,
        ShardOp::Append {
            from, key, body, ..
        },
    )] = &reqs[..]
    else {
        panic!("one append: {reqs:?}");
    };
    assert_eq!(
        (&**from, key.as_deref(), body.as_str()),
        ("p", Some("k"), r#"{"a":1}"#)
    );
    call.handle_reply(
        2,
        5,
        Reply::Frame(ServerOp::Ok {
            r: OP_REF,
            pos: None,
            seq: Some(9),
        }),
    );
    assert_eq!(call.poll_answer(), Some(RestAnswer::Appended { seq: 9 }));
    call.handle_reply(
        3,
        5,
        Reply::Frame(ServerOp::Ok {
            r: OP_REF,
            pos: None,
            seq: Some(10),
        }),
    );
    assert_eq!(call.poll_answer(), None, "one answer per call");
    let closes = requests(&mut call);
    assert_eq!(
        closes,
        vec![
            (Route::Shard(2), ShardOp::Closed),
            (Route::Shard(5), ShardOp::Closed)
        ]
    );
    assert_eq!(call.poll_timeout(), None);
}

#[test]
fn no_answer_in_time_a_restart_or_a_cancel_closes_the_session_everywhere() {
    // Proves an unanswered request ends with `unavailable` (timeout, restart) or no answer
    // (cancel), and `Closed` to every shard, since the one holding it is not known here.
    let mut call = RestCall::new(1, 100, &CONFIG, read(5, false));
    requests(&mut call);
    assert_eq!(call.poll_timeout(), Some(1_100));
    call.handle_timeout(1_099);
    assert_eq!(call.poll_answer(), None, "not yet");
    call.handle_timeout(1_100);
    assert_eq!(code(call.poll_answer()), ErrorCode::Unavailable);
    assert_eq!(
        requests(&mut call),
        vec![(Route::AllShards, ShardOp::Closed)]
    );

    let mut call = RestCall::new(2, 0, &CONFIG, read(5, false));
    requests(&mut call);
    call.handle_reply(1, 1, authed());
    requests(&mut call);
    call.handle_shard_restarted(2, 1);
    assert_eq!(code(call.poll_answer()), ErrorCode::Unavailable);
    assert_eq!(
        requests(&mut call),
        vec![(Route::AllShards, ShardOp::Closed)]
    );

    let mut call = RestCall::new(3, 0, &CONFIG, read(5, false));
    requests(&mut call);
    call.handle_cancel(1);
    assert_eq!(call.poll_answer(), None);
    assert_eq!(
        requests(&mut call),
        vec![(Route::AllShards, ShardOp::Closed)]
    );

    let mut call = RestCall::new(4, 0, &CONFIG, read(5, false));
    requests(&mut call);
    call.handle_reply(1, 0, authed());
    requests(&mut call);
    let page = Reply::Messages {
        r: OP_REF,
        events: Vec::<DeliveredEvent>::new(),
        head: 4,
    };
    call.handle_reply(2, 0, page);
    assert_eq!(
        call.poll_answer(),
        Some(RestAnswer::Page {
            events: Vec::new(),
            head: 4
        })
    );
}

#[test]
fn a_local_read_asks_for_local_authentication_and_a_local_page() {
    // Proves `?consistency=local` reaches the shards: both the call's `Auth` and its `Read`
    // say `local`, so the receiving node's replica answers them; a default read says neither.
    for local in [false, true] {
        let mut call = RestCall::new(1, 0, &CONFIG, read(5, local));
        let auth = requests(&mut call);
        assert!(matches!(auth[..], [(_, ShardOp::Auth { local: l, .. })] if l == local));
        call.handle_reply(1, 0, authed());
        let page = requests(&mut call);
        assert!(matches!(page[..], [(_, ShardOp::Read { local: l, .. })] if l == local));
        assert_eq!(page[0].1.is_local_read(), local);
    }
}
