//! Golden bytes: every client op and server frame in both encodings, exactly as docs/PROTOCOL.md
//! specifies them. The expected bytes are literals written down once and checked by hand
//! against the spec (postcard: varint enum index, then fields; strings and bytes length-prefixed;
//! JSON: `op` first, `ref` for `r`, absent options left out), never produced by the code under
//! test at test time. Reordering an enum, renaming or retyping a field fails here.

mod golden_cases;

use fabric_proto::codec;
use golden_cases::*;

/// (JSON text, binary hex) of each `client_ops()` case, in order.
const CLIENT_GOLDEN: &[(&str, &str)] = &[
    (r#"{"op":"hello","mesh":"m1","peer":"alice","token":"tok"}"#, "00026d3105616c69636503746f6b"),
    (r#"{"op":"send","ref":1,"to":"bob","body":{"a":1}}"#, "01010003626f62077b2261223a317d"),
    (r#"{"op":"send","ref":2,"to":"group:ops","body":"hi"}"#, "010201036f70730422686922"),
    (r#"{"op":"send","ref":300,"to":"*","body":[1,2]}"#, "01ac0202055b312c325d"),
    (r#"{"op":"append","ref":3,"conv":"c1","body":true,"key":"k1"}"#, "0203026331047472756501026b31"),
    (r#"{"op":"append","ref":4,"conv":"c1","body":false}"#, "02040263310566616c736500"),
    (r#"{"op":"subscribe","ref":5,"conv":"c1","from":7}"#, "030502633107"),
    (r#"{"op":"unsubscribe","ref":6,"conv":"c1"}"#, "0406026331"),
    (r#"{"op":"ack","upto":129}"#, "058101"),
    (r#"{"op":"ping","ref":8}"#, "0608"),
    (r#"[{"op":"ping","ref":9},{"op":"ack","upto":2}]"#, "070206090502"),
    (r#"{"op":"challenge"}"#, "08"),
    (r#"{"op":"hello","mesh":"m1","peer":"alice","sig":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f","ts":1700000000000}"#, "09026d3105616c69636540000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f80d095ffbc31"),
    (r#"{"op":"options","ref":10,"batch":64}"#, "0a0a40"),
];

/// (JSON text, binary hex) of each `server_ops()` case, in order. A `Batch` has no JSON form of
/// its own (JSON batches are arrays of frames, see `golden_batch_frames_join_encoded_frames`).
const SERVER_GOLDEN: &[(&str, &str)] = &[
    (
        r#"{"op":"welcome","session":42,"acked":3,"head":9}"#,
        "002a0309",
    ),
    (r#"{"op":"ok","ref":1,"pos":17}"#, "0101011100"),
    (r#"{"op":"ok","ref":3,"seq":5}"#, "0103000105"),
    (r#"{"op":"ok","ref":10}"#, "010a0000"),
    (
        r#"{"op":"deliver","pos":17,"from":"alice","to":"bob","body":{"a":1},"ts":1700000000001}"#,
        "021105616c6963650003626f62077b2261223a317d81d095ffbc31",
    ),
    (
        r#"{"op":"deliver","pos":18,"from":"alice","to":"group:ops","body":"hi","ts":1700000000002}"#,
        "021205616c69636501036f7073042268692282d095ffbc31",
    ),
    (
        r#"{"op":"deliver","pos":19,"from":"alice","to":"*","body":[1,2],"ts":1700000000003}"#,
        "021305616c69636502055b312c325d83d095ffbc31",
    ),
    (
        r#"{"op":"event","conv":"c1","seq":5,"from":"alice","body":true,"ts":1700000000004}"#,
        "030263310505616c696365047472756584d095ffbc31",
    ),
    (r#"{"op":"pong","ref":8}"#, "0408"),
    (
        r#"{"op":"error","ref":2,"code":"not_found","message":"no such peer"}"#,
        "050102040c6e6f20737563682070656572",
    ),
    (
        r#"{"op":"error","code":"overloaded","message":"slow"}"#,
        "05000704736c6f77",
    ),
    (r#""#, "060204010402"),
    (
        r#"{"op":"challenge","nonce":"0707070707070707070707070707070707070707070707070707070707070707"}"#,
        "070707070707070707070707070707070707070707070707070707070707070707",
    ),
];

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("golden hex")
}

#[test]
fn golden_cases_cover_every_variant() {
    // Proves the golden tables reach every ClientOp and ServerOp variant (the variant functions
    // are exhaustive matches, so a new variant must be added there and then here).
    let mut seen = vec![false; CLIENT_VARIANTS];
    client_ops()
        .iter()
        .for_each(|o| seen[client_variant(o)] = true);
    assert!(
        seen.iter().all(|s| *s),
        "client variants without a case: {seen:?}"
    );
    let mut seen = vec![false; SERVER_VARIANTS];
    server_ops()
        .iter()
        .for_each(|o| seen[server_variant(o)] = true);
    assert!(
        seen.iter().all(|s| *s),
        "server variants without a case: {seen:?}"
    );
    assert_eq!(client_ops().len(), CLIENT_GOLDEN.len());
    assert_eq!(server_ops().len(), SERVER_GOLDEN.len());
}

#[test]
fn golden_client_ops_encode_to_the_pinned_bytes() {
    // Proves the client-side encoders (the Rust client's) write exactly the pinned JSON and
    // postcard bytes for every client op.
    for (op, (json, bin)) in client_ops().iter().zip(CLIENT_GOLDEN) {
        let mut j = Vec::new();
        codec::encode_client_json(op, &mut j);
        assert_eq!(String::from_utf8(j).unwrap(), *json, "{op:?}");
        assert_eq!(codec::encode_client_binary(op), unhex(bin), "{op:?}");
    }
}

#[test]
fn golden_client_ops_decode_from_the_pinned_bytes() {
    // Proves the node's decoders read the pinned bytes of both encodings back into the same
    // op (a JSON array is a batch of ops, as on the wire).
    for (op, (json, bin)) in client_ops().iter().zip(CLIENT_GOLDEN) {
        let want = match op {
            fabric_proto::ClientOp::Batch(ops) => ops.clone(),
            op => vec![op.clone()],
        };
        let from_json = codec::decode_client_json(json.as_bytes()).expect(json);
        assert_eq!(from_json, want, "{json}");
        let from_bin = codec::decode_client_binary(&unhex(bin)).expect(bin);
        assert_eq!(from_bin, want, "{bin}");
    }
}

#[test]
fn golden_server_frames_encode_to_the_pinned_bytes() {
    // Proves the node's encoders write exactly the pinned JSON and postcard bytes for every
    // server frame.
    for (op, (json, bin)) in server_ops().iter().zip(SERVER_GOLDEN) {
        if !json.is_empty() {
            let mut j = Vec::new();
            codec::encode_server_json(op, &mut j);
            assert_eq!(String::from_utf8(j).unwrap(), *json, "{op:?}");
        }
        assert_eq!(codec::encode_server_binary(op), unhex(bin), "{op:?}");
    }
}

#[test]
fn golden_server_frames_decode_from_the_pinned_bytes() {
    // Proves the client's decoders read the pinned bytes back into the same frames (a binary
    // `Batch` unpacks into its frames).
    for (op, (json, bin)) in server_ops().iter().zip(SERVER_GOLDEN) {
        let want = match op {
            fabric_proto::ServerOp::Batch(ops) => ops.clone(),
            op => vec![op.clone()],
        };
        if !json.is_empty() {
            assert_eq!(
                codec::decode_server_json(json.as_bytes()).expect(json),
                want
            );
        }
        assert_eq!(codec::decode_server_binary(&unhex(bin)).expect(bin), want);
    }
}

#[test]
fn golden_batch_frames_join_encoded_frames() {
    // Proves batch frames are the pinned concatenations: a JSON array of the frames' text, and
    // a binary `Batch` (variant 6, count, then the frames' bytes as they are).
    let frames_json = vec![
        br#"{"op":"pong","ref":1}"#.to_vec(),
        br#"{"op":"pong","ref":2}"#.to_vec(),
    ];
    assert_eq!(
        codec::batch_server_frames(&frames_json, false),
        br#"[{"op":"pong","ref":1},{"op":"pong","ref":2}]"#.to_vec()
    );
    let frames_bin = vec![unhex("0401"), unhex("0402")];
    assert_eq!(
        codec::batch_server_frames(&frames_bin, true),
        unhex("060204010402")
    );
}

#[test]
fn golden_a_null_body_is_absent_in_json_and_a_value_in_binary() {
    // Proves the documented asymmetry (docs/PROTOCOL.md, "body"): JSON `"body":null` counts as
    // absent (bad_request), while a binary body holding the text `null` is accepted.
    let json = br#"{"op":"append","ref":4,"conv":"c1","body":null}"#;
    let e = codec::decode_client_json(json).expect_err("null is absent");
    assert_eq!(e.code, fabric_proto::ErrorCode::BadRequest);
    let bin = unhex("0204026331046e756c6c00");
    let ops = codec::decode_client_binary(&bin).expect("a binary null body");
    assert!(
        matches!(&ops[0], fabric_proto::ClientOp::Append { body, .. } if body.as_str() == "null")
    );
}
