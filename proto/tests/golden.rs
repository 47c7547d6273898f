//! Golden bytes of the client protocol: every client op and every server frame, in JSON text and
//! in binary (postcard), pinned as literals written from docs/PROTOCOL.md (its examples are used
//! verbatim where it has one) and checked against an encoder written separately from this crate.
//! Nothing here derives an expected byte from the code under test: reordering an enum, renaming
//! or retyping a field, or changing an escape fails one of these tests.
//!
//! Coverage is enforced twice: [`client_variant`] and [`server_variant`] match without a `_`
//! arm (a new variant does not compile until it is listed there with its wire tag), and
//! `golden_cases_cover_every_*_variant` fail until a golden case of each listed tag exists and
//! the decoder knows no tag past the last one.

use fabric_proto::codec::{
    batch_server_frames, decode_client_binary, decode_client_json, decode_server_binary,
    decode_server_json, encode_client_binary, encode_client_json, encode_server_binary,
    encode_server_json, from_binary,
};
use fabric_proto::{Body, ClientOp, DeliveredEvent, ErrorCode, ServerOp, Target};
use fabric_proto::{ConvId, GroupId, MeshId, PeerId};
use std::collections::BTreeSet;

/// Hex with any whitespace between bytes.
fn unhex(s: &str) -> Vec<u8> {
    let digits: String = s.split_whitespace().collect();
    hex::decode(digits).expect("golden hex is hex")
}

fn body(s: &str) -> Body {
    Body::from_trusted(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

/// The 64-byte signature of the signed-hello case: bytes 0, 1, ..., 63.
fn sig() -> Vec<u8> {
    (0u8..64).collect()
}

/// The nonce of the documented `challenge` example.
const NONCE_HEX: &str = "9f1c2f6a0d7e4b3a8c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3";

fn nonce() -> [u8; 32] {
    unhex(NONCE_HEX).try_into().expect("32 bytes")
}

/// One pinned frame: the value, its JSON text and its binary bytes (hex).
struct Golden<T> {
    name: &'static str,
    op: T,
    json: &'static str,
    binary: &'static str,
}

/// The postcard variant index (wire tag) and the JSON `op` of each client op. No `_` arm: a new
/// variant fails to compile here until it gets its tag and a golden case.
fn client_variant(op: &ClientOp) -> (u64, &'static str) {
    match op {
        ClientOp::Hello { .. } => (0, "hello"),
        // A keyed send has a wire variant of its own, appended at the end.
        ClientOp::Send { key: None, .. } => (1, "send"),
        ClientOp::Send { key: Some(_), .. } => (11, "send"),
        ClientOp::Append { .. } => (2, "append"),
        ClientOp::Subscribe { .. } => (3, "subscribe"),
        ClientOp::Unsubscribe { .. } => (4, "unsubscribe"),
        ClientOp::Ack { .. } => (5, "ack"),
        ClientOp::Ping { .. } => (6, "ping"),
        ClientOp::Batch(_) => (7, "(a JSON array)"),
        ClientOp::Challenge => (8, "challenge"),
        ClientOp::HelloSigned { .. } => (9, "hello"),
        ClientOp::Options { .. } => (10, "options"),
    }
}

/// The same for server frames.
fn server_variant(op: &ServerOp) -> (u64, &'static str) {
    match op {
        ServerOp::Welcome { nodes, .. } if nodes.is_empty() => (0, "welcome"),
        ServerOp::Welcome { .. } => (8, "welcome"),
        ServerOp::Ok { .. } => (1, "ok"),
        ServerOp::Deliver { .. } => (2, "deliver"),
        ServerOp::Event(_) => (3, "event"),
        ServerOp::Pong { .. } => (4, "pong"),
        ServerOp::Error { .. } => (5, "error"),
        ServerOp::Batch(_) => (6, "(a JSON array)"),
        ServerOp::Challenge { .. } => (7, "challenge"),
    }
}

/// The wire tag and JSON form of each send target.
fn target_variant(t: &Target) -> u64 {
    match t {
        Target::Peer(_) => 0,
        Target::Group(_) => 1,
        Target::All => 2,
    }
}

/// Every error code's number (binary frames) and name (JSON frames), as docs/PROTOCOL.md's
/// errors table gives them.
fn error_code_wire(c: ErrorCode) -> (u8, &'static str) {
    match c {
        ErrorCode::BadRequest => (1, "bad_request"),
        ErrorCode::Unauthorized => (2, "unauthorized"),
        ErrorCode::Forbidden => (3, "forbidden"),
        ErrorCode::NotFound => (4, "not_found"),
        ErrorCode::TooLarge => (5, "too_large"),
        ErrorCode::RateLimited => (6, "rate_limited"),
        ErrorCode::Overloaded => (7, "overloaded"),
        ErrorCode::Unavailable => (8, "unavailable"),
        ErrorCode::Conflict => (9, "conflict"),
        ErrorCode::Internal => (10, "internal"),
        ErrorCode::StorageFull => (11, "storage_full"),
        ErrorCode::InboxFull => (12, "inbox_full"),
        ErrorCode::ArchiveBacklogFull => (13, "archive_backlog_full"),
    }
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
fn client_goldens() -> Vec<Golden<ClientOp>> {
    vec![
        Golden {
            name: "hello (documented)",
            op: ClientOp::Hello {
                mesh: MeshId::must("demo"),
                peer: PeerId::must("bob"),
                token: "t0k".into(),
            },
            json: r#"{"op":"hello","mesh":"demo","peer":"bob","token":"t0k"}"#,
            binary: "00  04 64 65 6d 6f  03 62 6f 62  03 74 30 6b",
        },
        Golden {
            name: "hello, token with UTF-8 and a quote",
            op: ClientOp::Hello {
                mesh: MeshId::must("demo"),
                peer: PeerId::must("bob"),
                token: "pässwörd \"q\"".into(),
            },
            json: r#"{"op":"hello","mesh":"demo","peer":"bob","token":"pässwörd \"q\""}"#,
            binary: "00  04 64 65 6d 6f  03 62 6f 62  0e 70 c3 a4 73 73 77 c3 b6 72 64 20 22 71 22",
        },
        Golden {
            name: "send to a peer (documented)",
            op: ClientOp::Send {
                r: 1,
                to: Target::Peer(PeerId::must("bob")),
                body: body(r#"{"text":"hi"}"#),
                key: None,
            },
            json: r#"{"op":"send","ref":1,"to":"bob","body":{"text":"hi"}}"#,
            binary: "01  01  00 03 62 6f 62  0d 7b 22 74 65 78 74 22 3a 22 68 69 22 7d",
        },
        Golden {
            name: "send to a group",
            op: ClientOp::Send {
                r: 2,
                to: Target::Group(GroupId::must("ops")),
                body: body(r#""deploy at 5""#),
                key: None,
            },
            json: r#"{"op":"send","ref":2,"to":"group:ops","body":"deploy at 5"}"#,
            binary: "01  02  01 03 6f 70 73  0d 22 64 65 70 6c 6f 79 20 61 74 20 35 22",
        },
        Golden {
            name: "send to all",
            op: ClientOp::Send {
                r: 3,
                to: Target::All,
                body: body("[1,2,3]"),
                key: None,
            },
            json: r#"{"op":"send","ref":3,"to":"*","body":[1,2,3]}"#,
            binary: "01  03  02  07 5b 31 2c 32 2c 33 5d",
        },
        Golden {
            name: "send with a key (documented)",
            op: ClientOp::Send {
                r: 4,
                to: Target::Peer(PeerId::must("bob")),
                body: body(r#"{"text":"hi"}"#),
                key: Some("s-1".into()),
            },
            json: r#"{"op":"send","ref":4,"to":"bob","body":{"text":"hi"},"key":"s-1"}"#,
            binary:
                "0b  04  00 03 62 6f 62  0d 7b 22 74 65 78 74 22 3a 22 68 69 22 7d  03 73 2d 31",
        },
        Golden {
            name: "append with a key (documented)",
            op: ClientOp::Append {
                r: 4,
                conv: ConvId::must("standup"),
                body: body(r#"{"n":1}"#),
                key: Some("k1".into()),
            },
            json: r#"{"op":"append","ref":4,"conv":"standup","body":{"n":1},"key":"k1"}"#,
            binary: "02  04  07 73 74 61 6e 64 75 70  07 7b 22 6e 22 3a 31 7d  01 02 6b 31",
        },
        Golden {
            name: "append without a key",
            op: ClientOp::Append {
                r: 5,
                conv: ConvId::must("standup"),
                body: body(r#"{"text":"day 1"}"#),
                key: None,
            },
            json: r#"{"op":"append","ref":5,"conv":"standup","body":{"text":"day 1"}}"#,
            binary: "02  05  07 73 74 61 6e 64 75 70  \
                     10 7b 22 74 65 78 74 22 3a 22 64 61 79 20 31 22 7d  00",
        },
        Golden {
            name: "subscribe",
            op: ClientOp::Subscribe {
                r: 5,
                conv: ConvId::must("standup"),
                from: 1,
            },
            json: r#"{"op":"subscribe","ref":5,"conv":"standup","from":1}"#,
            binary: "03  05  07 73 74 61 6e 64 75 70  01",
        },
        Golden {
            name: "unsubscribe",
            op: ClientOp::Unsubscribe {
                r: 6,
                conv: ConvId::must("standup"),
            },
            json: r#"{"op":"unsubscribe","ref":6,"conv":"standup"}"#,
            binary: "04  06  07 73 74 61 6e 64 75 70",
        },
        Golden {
            name: "ack, a two-byte varint (documented)",
            op: ClientOp::Ack { upto: 300 },
            json: r#"{"op":"ack","upto":300}"#,
            binary: "05  ac 02",
        },
        Golden {
            name: "ping (documented)",
            op: ClientOp::Ping { r: 8 },
            json: r#"{"op":"ping","ref":8}"#,
            binary: "06  08",
        },
        Golden {
            name: "ping, the largest ref",
            op: ClientOp::Ping { r: u64::MAX },
            json: r#"{"op":"ping","ref":18446744073709551615}"#,
            binary: "06  ff ff ff ff ff ff ff ff ff 01",
        },
        Golden {
            name: "batch (documented)",
            op: ClientOp::Batch(vec![ClientOp::Ping { r: 9 }, ClientOp::Ack { upto: 2 }]),
            json: r#"[{"op":"ping","ref":9},{"op":"ack","upto":2}]"#,
            binary: "07 02  06 09  05 02",
        },
        Golden {
            name: "challenge",
            op: ClientOp::Challenge,
            json: r#"{"op":"challenge"}"#,
            binary: "08",
        },
        Golden {
            name: "hello signed with a key",
            op: ClientOp::HelloSigned {
                mesh: MeshId::must("demo"),
                peer: PeerId::must("alice"),
                sig: sig(),
                ts: 1_700_000_000_123,
            },
            json: concat!(
                r#"{"op":"hello","mesh":"demo","peer":"alice","sig":""#,
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
                r#"","ts":1700000000123}"#
            ),
            binary: "09  04 64 65 6d 6f  05 61 6c 69 63 65  40 \
                     00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f \
                     10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f \
                     20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f \
                     30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d 3e 3f  fb d0 95 ff bc 31",
        },
        Golden {
            name: "options",
            op: ClientOp::Options { r: 0, batch: 256 },
            json: r#"{"op":"options","ref":0,"batch":256}"#,
            binary: "0a  00  80 02",
        },
    ]
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
fn server_goldens() -> Vec<Golden<ServerOp>> {
    vec![
        Golden {
            name: "welcome (documented)",
            op: ServerOp::Welcome {
                session: 4,
                acked: 0,
                head: 0,
                nodes: Vec::new(),
            },
            json: r#"{"op":"welcome","session":4,"acked":0,"head":0}"#,
            binary: "00  04 00 00",
        },
        Golden {
            name: "welcome in a cluster (documented)",
            op: ServerOp::Welcome {
                session: 4,
                acked: 0,
                head: 0,
                nodes: vec!["http://127.0.0.1:7400".into()],
            },
            json: r#"{"op":"welcome","session":4,"acked":0,"head":0,"nodes":["http://127.0.0.1:7400"]}"#,
            binary:
                "08  04 00 00  01 15 68 74 74 70 3a 2f 2f 31 32 37 2e 30 2e 30 2e 31 3a 37 34 30 30",
        },
        Golden {
            name: "ok for a send (documented)",
            op: ServerOp::Ok {
                r: 1,
                pos: Some(1),
                seq: None,
            },
            json: r#"{"op":"ok","ref":1,"pos":1}"#,
            binary: "01  01  01 01  00",
        },
        Golden {
            name: "ok for an append (documented)",
            op: ServerOp::Ok {
                r: 4,
                pos: None,
                seq: Some(1),
            },
            json: r#"{"op":"ok","ref":4,"seq":1}"#,
            binary: "01  04  00  01 01",
        },
        Golden {
            name: "ok, bare (documented)",
            op: ServerOp::Ok {
                r: 6,
                pos: None,
                seq: None,
            },
            json: r#"{"op":"ok","ref":6}"#,
            binary: "01  06  00  00",
        },
        Golden {
            name: "deliver to a peer (documented)",
            op: ServerOp::Deliver {
                pos: 1,
                from: "alice".into(),
                to: Target::Peer(PeerId::must("bob")),
                body: body(r#"{"text":"hi"}"#),
                ts: 1_795_356_091_730,
            },
            json: r#"{"op":"deliver","pos":1,"from":"alice","to":"bob","body":{"text":"hi"},"ts":1795356091730}"#,
            binary: "02  01  05 61 6c 69 63 65  00 03 62 6f 62  \
                     0d 7b 22 74 65 78 74 22 3a 22 68 69 22 7d  d2 ca bf 9c a0 34",
        },
        Golden {
            name: "deliver to a group (documented JSON)",
            op: ServerOp::Deliver {
                pos: 2,
                from: "alice".into(),
                to: Target::Group(GroupId::must("ops")),
                body: body(r#""deploy at 5""#),
                ts: 1_795_356_091_730,
            },
            json: r#"{"op":"deliver","pos":2,"from":"alice","to":"group:ops","body":"deploy at 5","ts":1795356091730}"#,
            binary: "02  02  05 61 6c 69 63 65  01 03 6f 70 73  \
                     0d 22 64 65 70 6c 6f 79 20 61 74 20 35 22  d2 ca bf 9c a0 34",
        },
        Golden {
            name: "deliver to all, of a null body (a binary send may carry one)",
            op: ServerOp::Deliver {
                pos: 3,
                from: "alice".into(),
                to: Target::All,
                body: body("null"),
                ts: 0,
            },
            json: r#"{"op":"deliver","pos":3,"from":"alice","to":"*","body":null,"ts":0}"#,
            binary: "02  03  05 61 6c 69 63 65  02  04 6e 75 6c 6c  00",
        },
        Golden {
            name: "event (documented JSON)",
            op: ServerOp::Event(DeliveredEvent {
                conv: "standup".into(),
                seq: 1,
                from: "alice".into(),
                body: body(r#"{"text":"day 1"}"#),
                ts: 1_795_356_091_771,
            }),
            json: r#"{"op":"event","conv":"standup","seq":1,"from":"alice","body":{"text":"day 1"},"ts":1795356091771}"#,
            binary: "03  07 73 74 61 6e 64 75 70  01  05 61 6c 69 63 65  \
                     10 7b 22 74 65 78 74 22 3a 22 64 61 79 20 31 22 7d  fb ca bf 9c a0 34",
        },
        Golden {
            name: "pong (documented JSON)",
            op: ServerOp::Pong { r: 7 },
            json: r#"{"op":"pong","ref":7}"#,
            binary: "04  07",
        },
        Golden {
            name: "error with a ref (documented)",
            op: ServerOp::Error {
                r: Some(1),
                code: ErrorCode::NotFound,
                message: "no such peer".into(),
            },
            json: r#"{"op":"error","ref":1,"code":"not_found","message":"no such peer"}"#,
            binary: "05  01 01  04  0c 6e 6f 20 73 75 63 68 20 70 65 65 72",
        },
        Golden {
            name: "error without a ref, a message that needs escapes",
            op: ServerOp::Error {
                r: None,
                code: ErrorCode::BadRequest,
                message: "line1\nline2\t\"q\" é \u{1}".into(),
            },
            json: r#"{"op":"error","code":"bad_request","message":"line1\nline2\t\"q\" é \u0001"}"#,
            binary: "05  00  01  14 6c 69 6e 65 31 0a 6c 69 6e 65 32 09 22 71 22 20 c3 a9 20 01",
        },
        Golden {
            name: "batch",
            op: ServerOp::Batch(vec![
                ServerOp::Pong { r: 1 },
                ServerOp::Ok {
                    r: 2,
                    pos: None,
                    seq: Some(3),
                },
            ]),
            json: r#"[{"op":"pong","ref":1},{"op":"ok","ref":2,"seq":3}]"#,
            binary: "06 02  04 01  01 02 00 01 03",
        },
        Golden {
            name: "challenge (documented JSON)",
            op: ServerOp::Challenge { nonce: nonce() },
            json: r#"{"op":"challenge","nonce":"9f1c2f6a0d7e4b3a8c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3"}"#,
            binary: "07  9f 1c 2f 6a 0d 7e 4b 3a 8c 5d 6e 7f 80 91 a2 b3 \
                         c4 d5 e6 f7 08 19 2a 3b 4c 5d 6e 7f 80 91 a2 b3",
        },
    ]
}

/// What a decoder returns for one frame: a batch's ops, or the op alone.
fn client_flat(op: &ClientOp) -> Vec<ClientOp> {
    match op {
        ClientOp::Batch(ops) => ops.clone(),
        other => vec![other.clone()],
    }
}

fn server_flat(op: &ServerOp) -> Vec<ServerOp> {
    match op {
        ServerOp::Batch(ops) => ops.clone(),
        other => vec![other.clone()],
    }
}

/// The leading varint of a binary frame (its variant index).
fn leading_varint(bytes: &[u8]) -> u64 {
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return n;
        }
    }
    panic!("no varint at the start of {bytes:02x?}");
}

/// The JSON `op` of a one-op text frame, read with a plain JSON parser.
fn json_op(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("golden JSON is JSON");
    match &v {
        serde_json::Value::Array(_) => "(a JSON array)".into(),
        _ => v["op"].as_str().expect("a string op").into(),
    }
}

/// Whether some value of type `T` is encoded as the varint `tag` followed by up to 80 bytes
/// all `00` or all `01`. Between them these fill every field type the protocol uses (0 or 1,
/// an empty string or one of byte 01, `None` or `Some(1)`, an empty list, tag 0 or 1, a zeroed
/// array; an error code must be 1), so this is true exactly for the tags the enum has.
fn tag_exists<T: serde::de::DeserializeOwned>(tag: u8) -> bool {
    (0..=80).any(|len| {
        [0u8, 1].iter().any(|fill| {
            let mut bytes = vec![tag];
            bytes.resize(1 + len, *fill);
            from_binary::<T>(&bytes).is_ok()
        })
    })
}

#[test]
fn golden_client_ops_encode_to_the_pinned_json_and_binary() {
    // Proves the Rust client's encoders write every client op byte for byte as pinned.
    for g in client_goldens() {
        let mut json = Vec::new();
        encode_client_json(&g.op, &mut json);
        assert_eq!(
            String::from_utf8(json).expect("UTF-8"),
            g.json,
            "{}: JSON",
            g.name
        );
        assert_eq!(
            encode_client_binary(&g.op),
            unhex(g.binary),
            "{}: binary",
            g.name
        );
    }
}

#[test]
fn golden_client_ops_decode_from_the_pinned_json_and_binary() {
    // Proves the server's decoders read every pinned client frame as the op it stands for.
    for g in client_goldens() {
        assert_eq!(
            decode_client_json(g.json.as_bytes()).expect("golden JSON decodes"),
            client_flat(&g.op),
            "{}: JSON",
            g.name
        );
        assert_eq!(
            decode_client_binary(&unhex(g.binary)).expect("golden binary decodes"),
            client_flat(&g.op),
            "{}: binary",
            g.name
        );
    }
}

#[test]
fn golden_client_tags_and_json_ops_are_the_listed_ones() {
    // Proves each golden frame starts with its variant's pinned tag and names its pinned op,
    // and each send target's tag is the pinned one.
    for g in client_goldens() {
        let (tag, op) = client_variant(&g.op);
        assert_eq!(leading_varint(&unhex(g.binary)), tag, "{}", g.name);
        assert_eq!(json_op(g.json), op, "{}", g.name);
        if let ClientOp::Send { to, .. } = &g.op {
            assert_eq!(
                u64::from(unhex(g.binary)[2]),
                target_variant(to),
                "{}",
                g.name
            );
        }
    }
}

#[test]
fn golden_cases_cover_every_client_variant() {
    // Proves the golden cases hold every client op tag from 0 up, and that the decoder knows no
    // tag after the last one (so a new variant needs a golden case), and every target tag.
    let tags: BTreeSet<u64> = client_goldens()
        .iter()
        .map(|g| client_variant(&g.op).0)
        .collect();
    let n = tags.len() as u64;
    assert_eq!(tags, (0..n).collect(), "tags with golden cases");
    for tag in 0..n {
        assert!(tag_exists::<ClientOp>(tag as u8), "tag {tag} decodes");
    }
    assert!(
        !tag_exists::<ClientOp>(n as u8),
        "ClientOp has a variant with tag {n} and no golden case"
    );
    let targets: BTreeSet<u64> = client_goldens()
        .iter()
        .filter_map(|g| match &g.op {
            ClientOp::Send { to, .. } => Some(target_variant(to)),
            _ => None,
        })
        .collect();
    let t = targets.len() as u64;
    assert_eq!(targets, (0..t).collect());
    assert!(
        !tag_exists::<Target>(t as u8),
        "Target has a variant with tag {t} and no golden case"
    );
}

#[test]
fn golden_documented_client_examples_decode() {
    // Proves the JSON examples of docs/PROTOCOL.md's client op sections decode as described
    // (decode direction only: they are written by hand, with fields in the reader's order).
    let cases: Vec<(&str, ClientOp)> = vec![
        (
            r#"{"op":"hello","mesh":"demo","peer":"alice","token":"5dfaa212b9968c6e9dd90a5ca1c1415dad3665c03e5629bf990a09accce77837"}"#,
            ClientOp::Hello {
                mesh: MeshId::must("demo"),
                peer: PeerId::must("alice"),
                token: "5dfaa212b9968c6e9dd90a5ca1c1415dad3665c03e5629bf990a09accce77837".into(),
            },
        ),
        (
            r#"{"op":"send","ref":1,"to":"bob","body":{"text":"hi bob"}}"#,
            ClientOp::Send {
                r: 1,
                to: Target::Peer(PeerId::must("bob")),
                body: body(r#"{"text":"hi bob"}"#),
                key: None,
            },
        ),
        (
            r#"{"op":"append","ref":4,"conv":"standup","body":{"text":"day 1"},"key":"alice-1"}"#,
            ClientOp::Append {
                r: 4,
                conv: ConvId::must("standup"),
                body: body(r#"{"text":"day 1"}"#),
                key: Some("alice-1".into()),
            },
        ),
        (r#"{"op":"ack","upto":2}"#, ClientOp::Ack { upto: 2 }),
        (r#"{"op":"ping","ref":7}"#, ClientOp::Ping { r: 7 }),
        (
            r#"{"op":"subscribe","ref":5,"conv":"standup"}"#,
            ClientOp::Subscribe {
                r: 5,
                conv: ConvId::must("standup"),
                from: 1,
            },
        ),
    ];
    for (json, op) in cases {
        assert_eq!(
            decode_client_json(json.as_bytes()).unwrap(),
            vec![op],
            "{json}"
        );
    }
    let batch = r#"[{"op":"options","ref":0,"batch":256},{"op":"hello","mesh":"demo","peer":"bob","token":"x"}]"#;
    assert_eq!(
        decode_client_json(batch.as_bytes()).unwrap(),
        vec![
            ClientOp::Options { r: 0, batch: 256 },
            ClientOp::Hello {
                mesh: MeshId::must("demo"),
                peer: PeerId::must("bob"),
                token: "x".into()
            }
        ]
    );
}

#[test]
fn golden_server_frames_encode_to_the_pinned_json_and_binary() {
    // Proves the server's encoders write every server frame byte for byte as pinned.
    for g in server_goldens() {
        let mut json = Vec::new();
        encode_server_json(&g.op, &mut json);
        assert_eq!(
            String::from_utf8(json).expect("UTF-8"),
            g.json,
            "{}: JSON",
            g.name
        );
        assert_eq!(
            encode_server_binary(&g.op),
            unhex(g.binary),
            "{}: binary",
            g.name
        );
    }
}

#[test]
fn golden_server_frames_decode_from_the_pinned_json_and_binary() {
    // Proves the client-side decoders read every pinned server frame as the frame it stands for.
    for g in server_goldens() {
        assert_eq!(
            decode_server_json(g.json.as_bytes()).expect("golden JSON decodes"),
            server_flat(&g.op),
            "{}: JSON",
            g.name
        );
        assert_eq!(
            decode_server_binary(&unhex(g.binary)).expect("golden binary decodes"),
            server_flat(&g.op),
            "{}: binary",
            g.name
        );
    }
}

#[test]
fn golden_server_tags_and_json_ops_are_the_listed_ones() {
    // Proves each golden server frame starts with its variant's pinned tag and names its op.
    for g in server_goldens() {
        let (tag, op) = server_variant(&g.op);
        assert_eq!(leading_varint(&unhex(g.binary)), tag, "{}", g.name);
        assert_eq!(json_op(g.json), op, "{}", g.name);
    }
}

#[test]
fn golden_cases_cover_every_server_variant() {
    // Proves the golden cases hold every server frame tag from 0 up, and that the decoder knows
    // no tag after the last one (so a new variant needs a golden case).
    let tags: BTreeSet<u64> = server_goldens()
        .iter()
        .map(|g| server_variant(&g.op).0)
        .collect();
    let n = tags.len() as u64;
    assert_eq!(tags, (0..n).collect(), "tags with golden cases");
    for tag in 0..n {
        assert!(tag_exists::<ServerOp>(tag as u8), "tag {tag} decodes");
    }
    assert!(
        !tag_exists::<ServerOp>(n as u8),
        "ServerOp has a variant with tag {n} and no golden case"
    );
}

#[test]
fn golden_batch_frames_join_encoded_frames_to_the_pinned_bytes() {
    // Proves batch_server_frames joins frames encoded one by one into exactly the pinned batch
    // frame in both encodings, including a batch of 130 whose length takes two varint bytes.
    let pong = |r| ServerOp::Pong { r };
    let ok = ServerOp::Ok {
        r: 2,
        pos: None,
        seq: Some(3),
    };
    let frames = [pong(1), ok];
    let binary: Vec<Vec<u8>> = frames.iter().map(encode_server_binary).collect();
    assert_eq!(
        batch_server_frames(&binary, true),
        unhex("06 02  04 01  01 02 00 01 03")
    );
    let json: Vec<Vec<u8>> = frames
        .iter()
        .map(|op| {
            let mut out = Vec::new();
            encode_server_json(op, &mut out);
            out
        })
        .collect();
    assert_eq!(
        batch_server_frames(&json, false),
        br#"[{"op":"pong","ref":1},{"op":"ok","ref":2,"seq":3}]"#
    );
    // 130 pongs of ref 5: tag 6, length 130 = 82 01, then `04 05` 130 times.
    let many: Vec<Vec<u8>> = (0..130).map(|_| encode_server_binary(&pong(5))).collect();
    let mut want = unhex("06 82 01");
    want.extend(unhex("04 05").repeat(130));
    assert_eq!(batch_server_frames(&many, true), want);
    assert_eq!(
        encode_server_binary(&ServerOp::Batch(vec![pong(5); 130])),
        want
    );
    assert_eq!(decode_server_binary(&want).unwrap(), vec![pong(5); 130]);
    // An empty batch: `06 00` and `[]`.
    assert_eq!(batch_server_frames(&[], true), unhex("06 00"));
    assert_eq!(batch_server_frames(&[], false), b"[]");
    assert_eq!(decode_server_binary(&unhex("06 00")).unwrap(), vec![]);
    assert_eq!(decode_server_json(b"[]").unwrap(), vec![]);
}

#[test]
fn golden_error_frames_pin_every_error_code() {
    // Proves every error code travels as its pinned number in binary frames and its pinned
    // name in JSON frames, both ways, and that no code exists past the last one.
    for code in ErrorCode::ALL {
        let (number, name) = error_code_wire(code);
        let op = ServerOp::Error {
            r: None,
            code,
            message: String::new(),
        };
        let binary = vec![0x05, 0x00, number, 0x00];
        let json = format!(r#"{{"op":"error","code":"{name}","message":""}}"#);
        assert_eq!(encode_server_binary(&op), binary, "{name}");
        let mut out = Vec::new();
        encode_server_json(&op, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), json, "{name}");
        assert_eq!(decode_server_binary(&binary).unwrap(), vec![op.clone()]);
        assert_eq!(decode_server_json(json.as_bytes()).unwrap(), vec![op]);
    }
    let numbers: BTreeSet<u8> = ErrorCode::ALL
        .iter()
        .map(|c| error_code_wire(*c).0)
        .collect();
    let n = numbers.len() as u8;
    assert_eq!(numbers, (1..=n).collect());
    assert!(decode_server_binary(&[0x05, 0x00, 0, 0x00]).is_err());
    assert!(
        decode_server_binary(&[0x05, 0x00, n + 1, 0x00]).is_err(),
        "error code {} has no golden case",
        n + 1
    );
}

#[test]
fn golden_documented_server_examples_decode() {
    // Proves the JSON examples of docs/PROTOCOL.md's server frame sections decode as described.
    let cases: Vec<(&str, ServerOp)> = vec![
        (
            r#"{"op":"welcome","session":6,"acked":2,"head":2}"#,
            ServerOp::Welcome {
                session: 6,
                acked: 2,
                head: 2,
                nodes: Vec::new(),
            },
        ),
        (
            r#"{"op":"error","ref":4,"code":"not_found","message":"peer \"ghost\" is not a member of mesh \"demo\""}"#,
            ServerOp::Error {
                r: Some(4),
                code: ErrorCode::NotFound,
                message: "peer \"ghost\" is not a member of mesh \"demo\"".into(),
            },
        ),
        (
            r#"{"op":"error","code":"bad_request","message":"malformed JSON: key must be a string at line 1 column 2"}"#,
            ServerOp::Error {
                r: None,
                code: ErrorCode::BadRequest,
                message: "malformed JSON: key must be a string at line 1 column 2".into(),
            },
        ),
    ];
    for (json, op) in cases {
        assert_eq!(
            decode_server_json(json.as_bytes()).unwrap(),
            vec![op],
            "{json}"
        );
    }
    let batch = r#"[{"op":"ok","ref":0},{"op":"welcome","session":1,"acked":0,"head":0}]"#;
    assert_eq!(
        decode_server_json(batch.as_bytes()).unwrap(),
        vec![
            ServerOp::Ok {
                r: 0,
                pos: None,
                seq: None
            },
            ServerOp::Welcome {
                session: 1,
                acked: 0,
                head: 0,
                nodes: Vec::new(),
            }
        ]
    );
}

#[test]
fn golden_null_bodies_reach_json_clients_but_count_as_absent_in_client_ops() {
    // Proves a deliver or event whose body is `null` (a binary send may store one) decodes on
    // the client side, while a client op's `null` body is still refused as absent, also with
    // whitespace around it (the bug: the client's decoder refused the server's own frame).
    let deliver = br#"{"op":"deliver","pos":3,"from":"alice","to":"*","body":null,"ts":0}"#;
    assert_eq!(
        decode_server_json(deliver).unwrap(),
        vec![ServerOp::Deliver {
            pos: 3,
            from: "alice".into(),
            to: Target::All,
            body: body("null"),
            ts: 0,
        }]
    );
    let event = br#"{"op":"event","conv":"c","seq":1,"from":"a","body": null ,"ts":2}"#;
    assert_eq!(
        decode_server_json(event).unwrap(),
        vec![ServerOp::Event(DeliveredEvent {
            conv: "c".into(),
            seq: 1,
            from: "a".into(),
            body: body("null"),
            ts: 2,
        })]
    );
    for frame in [
        &br#"{"op":"send","ref":1,"to":"*","body":null}"#[..],
        br#"{"op":"send","ref":1,"to":"*","body" :  null }"#,
        br#"{"op":"append","ref":1,"conv":"c","body":null}"#,
        br#"[{"op":"ping","ref":1},{"op":"append","ref":1,"conv":"c","body":null}]"#,
    ] {
        let e = decode_client_json(frame).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("needs field \"body\""), "{}", e.message);
    }
    // A body that merely holds a null is a body.
    assert_eq!(
        decode_client_json(br#"{"op":"send","ref":1,"to":"*","body":[null]}"#).unwrap(),
        vec![ClientOp::Send {
            r: 1,
            to: Target::All,
            body: body("[null]"),
            key: None,
        }]
    );
}
