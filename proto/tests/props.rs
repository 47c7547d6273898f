//! Properties of both codecs over arbitrary input (proptest): decoding never panics, whatever
//! the bytes; every valid op round-trips through both encodings unchanged.

mod golden_cases;

use fabric_proto::{codec, ClientOp, ServerOp, Target};
use proptest::prelude::*;

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_.-]{0,15}"
}

fn body() -> impl Strategy<Value = fabric_proto::Body> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| format!("\"{s}\"")),
        (any::<u32>(), "[a-z]{1,5}").prop_map(|(n, k)| format!(r#"{{"{k}":[{n},true]}}"#)),
    ]
    .prop_map(|s: String| golden_cases::body(&s))
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        id().prop_map(|p| Target::Peer(p.into())),
        id().prop_map(|g| Target::Group(g.into())),
        Just(Target::All),
    ]
}

fn client_op() -> impl Strategy<Value = ClientOp> {
    prop_oneof![
        (id(), id(), "[a-zA-Z0-9]{1,40}").prop_map(|(m, p, t)| ClientOp::Hello {
            mesh: m.into(),
            peer: p.into(),
            token: t
        }),
        (any::<u64>(), target(), body()).prop_map(|(r, to, body)| ClientOp::Send { r, to, body }),
        (any::<u64>(), id(), body(), proptest::option::of(id())).prop_map(|(r, c, body, k)| {
            ClientOp::Append {
                r,
                conv: c.into(),
                body,
                key: k.map(Into::into),
            }
        }),
        (any::<u64>(), id(), any::<u64>()).prop_map(|(r, c, from)| ClientOp::Subscribe {
            r,
            conv: c.into(),
            from
        }),
        (any::<u64>(), id()).prop_map(|(r, c)| ClientOp::Unsubscribe { r, conv: c.into() }),
        any::<u64>().prop_map(|upto| ClientOp::Ack { upto }),
        any::<u64>().prop_map(|r| ClientOp::Ping { r }),
        Just(ClientOp::Challenge),
        (any::<u64>(), 0u32..1024).prop_map(|(r, batch)| ClientOp::Options { r, batch }),
    ]
}

fn server_op() -> impl Strategy<Value = ServerOp> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(session, acked, head)| {
            ServerOp::Welcome {
                session,
                acked,
                head,
            }
        }),
        (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(r, pos)| ServerOp::Ok {
            r,
            pos,
            seq: None
        }),
        (any::<u64>(), id(), target(), body(), any::<u64>()).prop_map(|(pos, f, to, body, ts)| {
            ServerOp::Deliver {
                pos,
                from: f.into(),
                to,
                body,
                ts,
            }
        }),
        any::<u64>().prop_map(|r| ServerOp::Pong { r }),
        (proptest::option::of(any::<u64>()), "[a-z ]{0,30}").prop_map(|(r, message)| {
            ServerOp::Error {
                r,
                code: fabric_proto::ErrorCode::BadRequest,
                message,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        // Proves every decoder returns a value or an error on any input, never a panic.
        let _ = codec::decode_client_json(&bytes);
        let _ = codec::decode_client_binary(&bytes);
        let _ = codec::decode_server_json(&bytes);
        let _ = codec::decode_server_binary(&bytes);
    }

    #[test]
    fn decoding_mutated_valid_frames_never_panics(
        op in client_op(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()
    ) {
        // Proves decoders survive near-valid input: a valid frame with one byte changed and
        // cut short, in both encodings.
        let mut j = Vec::new();
        codec::encode_client_json(&op, &mut j);
        for mut frame in [j, codec::encode_client_binary(&op)] {
            let n = frame.len();
            frame[at % n] = byte;
            frame.truncate(cut % (n + 1));
            let _ = codec::decode_client_json(&frame);
            let _ = codec::decode_client_binary(&frame);
        }
    }

    #[test]
    fn client_ops_round_trip_in_both_encodings(op in client_op()) {
        // Proves encode then decode gives the op back, in JSON and in postcard.
        let mut j = Vec::new();
        codec::encode_client_json(&op, &mut j);
        prop_assert_eq!(codec::decode_client_json(&j).unwrap(), vec![op.clone()]);
        let b = codec::encode_client_binary(&op);
        prop_assert_eq!(codec::decode_client_binary(&b).unwrap(), vec![op]);
    }

    #[test]
    fn server_frames_round_trip_in_both_encodings(op in server_op()) {
        // Proves encode then decode gives the frame back, in JSON and in postcard.
        let mut j = Vec::new();
        codec::encode_server_json(&op, &mut j);
        prop_assert_eq!(codec::decode_server_json(&j).unwrap(), vec![op.clone()]);
        let b = codec::encode_server_binary(&op);
        prop_assert_eq!(codec::decode_server_binary(&b).unwrap(), vec![op]);
    }
}
