//! The sample values the golden tests pin (shared by `golden.rs` and `props.rs`). Every
//! variant of `ClientOp` and `ServerOp` has a case: `client_variant` and `server_variant` are
//! exhaustive matches, so a new variant does not compile until it gets one.

#![allow(dead_code)]

use fabric_proto::{Body, ClientOp, DeliveredEvent, ErrorCode, ServerOp, Target};

pub fn body(json: &str) -> Body {
    Body::from_json_text(json.to_string()).expect("a valid body")
}

/// Which variant `op` is (exhaustive: no `_` arm).
pub fn client_variant(op: &ClientOp) -> usize {
    match op {
        ClientOp::Hello { .. } => 0,
        ClientOp::Send { .. } => 1,
        ClientOp::Append { .. } => 2,
        ClientOp::Subscribe { .. } => 3,
        ClientOp::Unsubscribe { .. } => 4,
        ClientOp::Ack { .. } => 5,
        ClientOp::Ping { .. } => 6,
        ClientOp::Batch(_) => 7,
        ClientOp::Challenge => 8,
        ClientOp::HelloSigned { .. } => 9,
        ClientOp::Options { .. } => 10,
    }
}
pub const CLIENT_VARIANTS: usize = 11;

/// Which variant `op` is (exhaustive: no `_` arm).
pub fn server_variant(op: &ServerOp) -> usize {
    match op {
        ServerOp::Welcome { .. } => 0,
        ServerOp::Ok { .. } => 1,
        ServerOp::Deliver { .. } => 2,
        ServerOp::Event(_) => 3,
        ServerOp::Pong { .. } => 4,
        ServerOp::Error { .. } => 5,
        ServerOp::Batch(_) => 6,
        ServerOp::Challenge { .. } => 7,
    }
}
pub const SERVER_VARIANTS: usize = 8;

pub fn client_ops() -> Vec<ClientOp> {
    vec![
        ClientOp::Hello {
            mesh: "m1".into(),
            peer: "alice".into(),
            token: "tok".into(),
        },
        ClientOp::Send {
            r: 1,
            to: Target::Peer("bob".into()),
            body: body(r#"{"a":1}"#),
        },
        ClientOp::Send {
            r: 2,
            to: Target::Group("ops".into()),
            body: body("\"hi\""),
        },
        ClientOp::Send {
            r: 300,
            to: Target::All,
            body: body("[1,2]"),
        },
        ClientOp::Append {
            r: 3,
            conv: "c1".into(),
            body: body("true"),
            key: Some("k1".into()),
        },
        ClientOp::Append {
            r: 4,
            conv: "c1".into(),
            body: body("false"),
            key: None,
        },
        ClientOp::Subscribe {
            r: 5,
            conv: "c1".into(),
            from: 7,
        },
        ClientOp::Unsubscribe {
            r: 6,
            conv: "c1".into(),
        },
        ClientOp::Ack { upto: 129 },
        ClientOp::Ping { r: 8 },
        ClientOp::Batch(vec![ClientOp::Ping { r: 9 }, ClientOp::Ack { upto: 2 }]),
        ClientOp::Challenge,
        ClientOp::HelloSigned {
            mesh: "m1".into(),
            peer: "alice".into(),
            sig: (0u8..64).collect(),
            ts: 1_700_000_000_000,
        },
        ClientOp::Options { r: 10, batch: 64 },
    ]
}

pub fn server_ops() -> Vec<ServerOp> {
    vec![
        ServerOp::Welcome {
            session: 42,
            acked: 3,
            head: 9,
        },
        ServerOp::Ok {
            r: 1,
            pos: Some(17),
            seq: None,
        },
        ServerOp::Ok {
            r: 3,
            pos: None,
            seq: Some(5),
        },
        ServerOp::Ok {
            r: 10,
            pos: None,
            seq: None,
        },
        ServerOp::Deliver {
            pos: 17,
            from: "alice".into(),
            to: Target::Peer("bob".into()),
            body: body(r#"{"a":1}"#),
            ts: 1_700_000_000_001,
        },
        ServerOp::Deliver {
            pos: 18,
            from: "alice".into(),
            to: Target::Group("ops".into()),
            body: body("\"hi\""),
            ts: 1_700_000_000_002,
        },
        ServerOp::Deliver {
            pos: 19,
            from: "alice".into(),
            to: Target::All,
            body: body("[1,2]"),
            ts: 1_700_000_000_003,
        },
        ServerOp::Event(DeliveredEvent {
            conv: "c1".into(),
            seq: 5,
            from: "alice".into(),
            body: body("true"),
            ts: 1_700_000_000_004,
        }),
        ServerOp::Pong { r: 8 },
        ServerOp::Error {
            r: Some(2),
            code: ErrorCode::NotFound,
            message: "no such peer".into(),
        },
        ServerOp::Error {
            r: None,
            code: ErrorCode::Overloaded,
            message: "slow".into(),
        },
        ServerOp::Batch(vec![ServerOp::Pong { r: 1 }, ServerOp::Pong { r: 2 }]),
        ServerOp::Challenge { nonce: [7; 32] },
    ]
}
