//! bytes <-> frames. The one module that knows JSON and postcard.
//!
//! JSON frames are flat objects keyed by `op` (see docs/PROTOCOL.md); a text frame may also be a
//! top-level array of such objects (a batch). Bodies are carried as raw JSON, never re-parsed
//! into a tree: decoding borrows the body's text, encoding splices it in.
//!
//! Binary frames are the postcard encoding of [`ClientOp`] / [`ServerOp`], whose enum order is
//! the wire format. Postcard's format is documented and stable since 1.0.

use crate::hello::{NONCE_BYTES, SIGNATURE_BYTES};
use crate::{
    validate_conv, validate_id, validate_key, Body, ClientOp, ConvId, DeliveredEvent, ErrorCode,
    IdKind, MeshId, PeerId, ProtoError, ServerOp, Target, BATCH_OPS_MAX,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;

/// Postcard-encodes any serde value (binary frames, WAL payloads).
pub fn to_binary<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing into a Vec only fails for types serde cannot represent; ours are all plain data.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Postcard-encodes any serde value onto the end of `out` (WAL records are framed straight
/// into the group-commit buffer: no intermediate `Vec`, no second copy). On the impossible
/// error `out` is left as it was.
pub fn to_binary_into<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    if postcard::serialize_with_flavor(value, AppendFlavor(out)).is_err() {
        out.truncate(start);
    }
}

/// A postcard output that appends to a borrowed `Vec`.
struct AppendFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Postcard-decodes any serde value; trailing bytes are an error.
/// The leading fields of a postcard value, borrowed where the type borrows: `T` is a struct
/// whose fields are the first fields of the encoded one, in order; the rest is not read.
pub fn from_binary_prefix<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::take_from_bytes(bytes)
        .ok()
        .map(|(value, _)| value)
}

pub fn from_binary<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ProtoError> {
    let (value, rest) = postcard::take_from_bytes(bytes)
        .map_err(|e| ProtoError::bad_request(format!("binary frame does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(ProtoError::bad_request(format!(
            "binary frame has {} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

/// The flat JSON shape shared by every frame in both directions. Unknown fields are ignored so
/// that fields can be added without breaking old peers.
#[derive(Deserialize, Default)]
struct JsonFrame<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(rename = "ref")]
    r: Option<u64>,
    #[serde(borrow)]
    mesh: Option<Cow<'a, str>>,
    #[serde(borrow)]
    peer: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    from: Option<FromField<'a>>,
    /// Kept when it is `null` too (a plain `Option` would read `null` as absent): a client op's
    /// `null` body counts as absent ([`body_of`]), but a server frame's is the body as stored.
    #[serde(borrow, default, deserialize_with = "raw_even_null")]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    conv: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    upto: Option<u64>,
    session: Option<u64>,
    acked: Option<u64>,
    head: Option<u64>,
    /// `welcome`'s node list, read only from server frames (raw here, so a client op that
    /// carries some other `nodes` is not refused: unknown fields are ignored).
    #[serde(borrow)]
    nodes: Option<&'a RawValue>,
    pos: Option<u64>,
    seq: Option<u64>,
    ts: Option<u64>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sig: Option<Cow<'a, str>>,
    #[serde(borrow)]
    nonce: Option<Cow<'a, str>>,
    batch: Option<u32>,
}

/// A present field's raw JSON text, `null` included.
fn raw_even_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// `from` is a number in `subscribe` (a seq) and a peer id in `deliver`/`event`.
#[derive(Deserialize)]
#[serde(untagged)]
enum FromField<'a> {
    Seq(u64),
    #[serde(borrow)]
    Peer(Cow<'a, str>),
}

fn missing(op: &str, field: &str) -> ProtoError {
    ProtoError::bad_request(format!("{op} needs field \"{field}\""))
}

fn json_frames(bytes: &[u8]) -> Result<Vec<JsonFrame<'_>>, ProtoError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let frames: Vec<JsonFrame<'_>> = serde_json::from_slice(bytes)
            .map_err(|e| ProtoError::bad_request(format!("malformed JSON batch: {e}")))?;
        if frames.len() > BATCH_OPS_MAX {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "batch has {} ops; the limit is {BATCH_OPS_MAX}",
                    frames.len()
                ),
            ));
        }
        Ok(frames)
    } else {
        let frame: JsonFrame<'_> = serde_json::from_slice(bytes)
            .map_err(|e| ProtoError::bad_request(format!("malformed JSON: {e}")))?;
        Ok(vec![frame])
    }
}

fn body_of(op: &str, body: Option<&RawValue>) -> Result<Body, ProtoError> {
    // A `null` body counts as absent in a client op (docs/PROTOCOL.md, "Client ops").
    let raw = body
        .filter(|raw| raw.get() != "null")
        .ok_or_else(|| missing(op, "body"))?;
    // The JSON parser already validated the value (and its UTF-8); keep its exact text.
    Body::from_parsed_json(raw.get())
}

/// A body in a server frame: the node validated it when it was stored, so it is kept as it is
/// (a client that refused an old body would stall on a message it can never acknowledge), and
/// that includes `null`, which a binary send may carry.
fn server_body_of(op: &str, body: Option<&RawValue>) -> Result<Body, ProtoError> {
    let raw = body.ok_or_else(|| missing(op, "body"))?;
    Ok(Body::from_trusted(bytes::Bytes::copy_from_slice(
        raw.get().as_bytes(),
    )))
}

// Over 70 lines: one arm per client op; split, the JSON wire format would be scattered.
fn client_op_from_json(f: JsonFrame<'_>) -> Result<ClientOp, ProtoError> {
    let op =
        f.op.as_deref()
            .ok_or_else(|| ProtoError::bad_request("frame has no \"op\""))?;
    let r = || f.r.ok_or_else(|| missing(op, "ref"));
    Ok(match op {
        "hello" => {
            let mesh = MeshId::new(f.mesh.as_deref().ok_or_else(|| missing(op, "mesh"))?)?;
            let peer = PeerId::new(f.peer.as_deref().ok_or_else(|| missing(op, "peer"))?)?;
            match f.sig.as_deref() {
                Some(sig) => {
                    if f.token.is_some() {
                        return Err(ProtoError::bad_request(
                            "hello carries either \"token\" or \"sig\" and \"ts\", not both",
                        ));
                    }
                    let sig = decode_hex_exact("hello", "sig", sig, SIGNATURE_BYTES)?;
                    ClientOp::HelloSigned {
                        mesh,
                        peer,
                        sig,
                        ts: f.ts.ok_or_else(|| missing(op, "ts"))?,
                    }
                }
                None => ClientOp::Hello {
                    mesh,
                    peer,
                    token: f.token.as_deref().unwrap_or_default().to_string(),
                },
            }
        }
        "challenge" => ClientOp::Challenge,
        "send" => {
            let to = f.to.as_deref().ok_or_else(|| missing(op, "to"))?;
            ClientOp::Send {
                r: r()?,
                to: Target::parse(to)?,
                body: body_of(op, f.body)?,
                key: key_of(f.key.as_deref())?,
            }
        }
        "append" => {
            let conv = ConvId::new(f.conv.as_deref().ok_or_else(|| missing(op, "conv"))?)?;
            let key = key_of(f.key.as_deref())?;
            ClientOp::Append {
                r: r()?,
                conv,
                body: body_of(op, f.body)?,
                key,
            }
        }
        "subscribe" => {
            let conv = ConvId::new(f.conv.as_deref().ok_or_else(|| missing(op, "conv"))?)?;
            let from = match f.from {
                Some(FromField::Seq(n)) => n,
                None => 1,
                Some(FromField::Peer(_)) => {
                    return Err(ProtoError::bad_request("subscribe \"from\" is a sequence number"))
                }
            };
            ClientOp::Subscribe {
                r: r()?,
                conv,
                from,
            }
        }
        "unsubscribe" => {
            let conv = ConvId::new(f.conv.as_deref().ok_or_else(|| missing(op, "conv"))?)?;
            ClientOp::Unsubscribe {
                r: r()?,
                conv,
            }
        }
        "ack" => ClientOp::Ack {
            upto: f.upto.ok_or_else(|| missing(op, "upto"))?,
        },
        "ping" => ClientOp::Ping { r: r()? },
        "options" => ClientOp::Options {
            r: r()?,
            batch: f.batch.ok_or_else(|| missing(op, "batch"))?,
        },
        other => {
            return Err(ProtoError::bad_request(format!(
                "unknown op {other:?}; expected hello, challenge, send, append, subscribe, unsubscribe, ack, ping or options"
            )))
        }
    })
}

/// Decodes one text frame from a client: a single op or a batch. A batch fails as a whole if
/// any op in it is malformed, so a client never has to guess which half was taken.
pub fn decode_client_json(bytes: &[u8]) -> Result<Vec<ClientOp>, ProtoError> {
    json_frames(bytes)?
        .into_iter()
        .map(client_op_from_json)
        .collect()
}

/// Decodes one binary frame from a client (a `Batch` is flattened; nested batches are refused
/// before anything recursive runs, see [`decode_flat`]).
/// An optional idempotency key, checked (`append` and `send` share the rule).
fn key_of(key: Option<&str>) -> Result<Option<Arc<str>>, ProtoError> {
    match key {
        Some(k) => {
            validate_key(k)?;
            Ok(Some(Arc::from(k)))
        }
        None => Ok(None),
    }
}

/// The body of an HTTP append, `{"body": JSON, "key": string}` (`key` optional): the body as
/// it was written (nesting checked), and the key, not yet validated.
pub fn decode_rest_append(bytes: &[u8]) -> Result<(Body, Option<String>), ProtoError> {
    #[derive(Deserialize)]
    struct AppendBody<'a> {
        #[serde(borrow)]
        body: Option<&'a RawValue>,
        key: Option<String>,
    }
    let req: AppendBody<'_> = serde_json::from_slice(bytes).map_err(|e| {
        ProtoError::bad_request(format!("request body is not the expected JSON: {e}"))
    })?;
    let raw = req
        .body
        .ok_or_else(|| ProtoError::bad_request("request needs field \"body\""))?;
    Ok((Body::from_parsed_json(raw.get())?, req.key))
}

pub fn decode_client_binary(bytes: &[u8]) -> Result<Vec<ClientOp>, ProtoError> {
    let ops = decode_flat::<ClientOp>(bytes, CLIENT_BATCH_VARIANT)?;
    ops.iter().try_for_each(validate_binary_op)?;
    Ok(ops)
}

/// The postcard variant index of `ClientOp::Batch` (its place in the enum; pinned by a test).
const CLIENT_BATCH_VARIANT: u32 = 7;

/// Decodes a binary frame of an op enum whose variant `batch_variant` is a `Vec` of the same
/// enum, flattened into its ops.
///
/// Postcard decodes `Batch(Vec<Op>)` by recursion, one stack frame set per nesting level, and a
/// frame of 12 KB of nested batch tags (`07 01` repeated) overflows the stack before any check
/// could run. So the top level is read by hand: the variant index, and for a batch its length
/// and each element's variant index, which must not be a batch again; postcard only ever
/// decodes ops that cannot nest.
fn decode_flat<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    batch_variant: u32,
) -> Result<Vec<T>, ProtoError> {
    let (tag, rest) = take_varint_u32(bytes)?;
    if tag != batch_variant {
        return Ok(vec![from_binary::<T>(bytes)?]);
    }
    let (n, mut rest) = take_varint_u64(rest)?;
    if n > BATCH_OPS_MAX as u64 {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!("batch has {n} ops; the limit is {BATCH_OPS_MAX}"),
        ));
    }
    let mut ops = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if take_varint_u32(rest)?.0 == batch_variant {
            return Err(ProtoError::bad_request("batches may not nest"));
        }
        let (op, after) = postcard::take_from_bytes::<T>(rest)
            .map_err(|e| ProtoError::bad_request(format!("binary frame does not decode: {e}")))?;
        ops.push(op);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(ProtoError::bad_request(format!(
            "binary frame has {} trailing bytes",
            rest.len()
        )));
    }
    Ok(ops)
}

/// Postcard's varint for a `u32` (variant indices): at most 5 bytes, the last one at most 0x0f.
fn take_varint_u32(bytes: &[u8]) -> Result<(u32, &[u8]), ProtoError> {
    let (n, rest) = take_varint(bytes, 5, 0x0f)?;
    Ok((n as u32, rest))
}

/// Postcard's varint for a `u64` or `usize` (lengths): at most 10 bytes, the last one at most 1.
fn take_varint_u64(bytes: &[u8]) -> Result<(u64, &[u8]), ProtoError> {
    take_varint(bytes, 10, 0x01)
}

/// Unsigned LEB128 exactly as postcard reads it (so a tag means here what it means there).
fn take_varint(bytes: &[u8], len_max: usize, last_max: u8) -> Result<(u64, &[u8]), ProtoError> {
    let mut out = 0u64;
    for i in 0..len_max {
        let b = *bytes
            .get(i)
            .ok_or_else(|| ProtoError::bad_request("binary frame ends inside a varint"))?;
        out |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i == len_max - 1 && b > last_max {
                break;
            }
            return Ok((out, &bytes[i + 1..]));
        }
    }
    Err(ProtoError::bad_request("binary frame has a bad varint"))
}

/// Binary frames skip the JSON parser, so their ids and bodies are checked here.
fn validate_binary_op(op: &ClientOp) -> Result<(), ProtoError> {
    match op {
        ClientOp::Hello { mesh, peer, .. } => {
            validate_id(IdKind::Mesh, mesh)?;
            validate_id(IdKind::Peer, peer)
        }
        ClientOp::HelloSigned {
            mesh, peer, sig, ..
        } => {
            validate_id(IdKind::Mesh, mesh)?;
            validate_id(IdKind::Peer, peer)?;
            if sig.len() != SIGNATURE_BYTES {
                return Err(ProtoError::bad_request(format!(
                    "hello \"sig\" is {} bytes; an ed25519 signature is {SIGNATURE_BYTES}",
                    sig.len()
                )));
            }
            Ok(())
        }
        ClientOp::Send { body, key, .. } => {
            if let Some(k) = key {
                validate_key(k)?;
            }
            Body::from_json_text(body.0.clone()).map(|_| ())
        }
        ClientOp::Append {
            conv, body, key, ..
        } => {
            validate_conv(conv)?;
            if let Some(k) = key {
                validate_key(k)?;
            }
            Body::from_json_text(body.0.clone()).map(|_| ())
        }
        ClientOp::Subscribe { conv, .. } | ClientOp::Unsubscribe { conv, .. } => {
            validate_conv(conv)
        }
        ClientOp::Ack { .. }
        | ClientOp::Ping { .. }
        | ClientOp::Batch(_)
        | ClientOp::Challenge
        | ClientOp::Options { .. } => Ok(()),
    }
}

/// Decodes a hex field that must be exactly `len` bytes.
fn decode_hex_exact(op: &str, name: &str, text: &str, len: usize) -> Result<Vec<u8>, ProtoError> {
    let bytes = hex::decode(text)
        .map_err(|e| ProtoError::bad_request(format!("{op} \"{name}\" is not hex: {e}")))?;
    if bytes.len() != len {
        return Err(ProtoError::bad_request(format!(
            "{op} \"{name}\" is {} bytes; it must be {len} (hex of {} characters)",
            bytes.len(),
            2 * len
        )));
    }
    Ok(bytes)
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a JSON array: `[`, each item as `each` writes it, commas between, `]`.
fn push_array<T>(out: &mut Vec<u8>, items: &[T], mut each: impl FnMut(&T, &mut Vec<u8>)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(item, out);
    }
    out.push(b']');
}

fn field(out: &mut Vec<u8>, name: &str) {
    out.push(b',');
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends the JSON text of one server frame to `out`.
// Over 70 lines: one arm per server frame; split, the JSON wire format would be scattered.
pub fn encode_server_json(op: &ServerOp, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"op\":");
    push_str(out, op.name());
    match op {
        ServerOp::Welcome {
            session,
            acked,
            head,
            nodes,
        } => {
            field(out, "session");
            push_u64(out, *session);
            field(out, "acked");
            push_u64(out, *acked);
            field(out, "head");
            push_u64(out, *head);
            if !nodes.is_empty() {
                field(out, "nodes");
                push_array(out, nodes, |node, out| push_str(out, node));
            }
        }
        ServerOp::Ok { r, pos, seq } => {
            field(out, "ref");
            push_u64(out, *r);
            if let Some(p) = pos {
                field(out, "pos");
                push_u64(out, *p);
            }
            if let Some(s) = seq {
                field(out, "seq");
                push_u64(out, *s);
            }
        }
        ServerOp::Deliver {
            pos,
            from,
            to,
            body,
            ts,
        } => {
            field(out, "pos");
            push_u64(out, *pos);
            field(out, "from");
            push_str(out, from);
            field(out, "to");
            push_str(out, &to.to_wire());
            field(out, "body");
            out.extend_from_slice(&body.0);
            field(out, "ts");
            push_u64(out, *ts);
        }
        ServerOp::Event(e) => {
            field(out, "conv");
            push_str(out, &e.conv);
            field(out, "seq");
            push_u64(out, e.seq);
            field(out, "from");
            push_str(out, &e.from);
            field(out, "body");
            out.extend_from_slice(&e.body.0);
            field(out, "ts");
            push_u64(out, e.ts);
        }
        ServerOp::Pong { r } => {
            field(out, "ref");
            push_u64(out, *r);
        }
        ServerOp::Challenge { nonce } => {
            field(out, "nonce");
            push_str(out, &hex::encode(nonce));
        }
        ServerOp::Error { r, code, message } => {
            if let Some(r) = r {
                field(out, "ref");
                push_u64(out, *r);
            }
            field(out, "code");
            push_str(out, code.as_str());
            field(out, "message");
            push_str(out, message);
        }
        ServerOp::Batch(ops) => {
            // JSON has no batch op: a batch is a top-level array. Undo the object opener.
            out.truncate(out.len() - b"{\"op\":\"batch\"".len());
            push_array(out, ops, encode_server_json);
            return;
        }
    }
    out.push(b'}');
}

pub fn encode_server_binary(op: &ServerOp) -> Vec<u8> {
    to_binary(op)
}

/// Appends the JSON text of one client op to `out` (used by the Rust client and the bench).
// Over 70 lines: one arm per client op; split, the JSON wire format would be scattered.
pub fn encode_client_json(op: &ClientOp, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"op\":");
    push_str(out, op.name());
    match op {
        ClientOp::Hello { mesh, peer, token } => {
            field(out, "mesh");
            push_str(out, mesh);
            field(out, "peer");
            push_str(out, peer);
            field(out, "token");
            push_str(out, token);
        }
        ClientOp::HelloSigned {
            mesh,
            peer,
            sig,
            ts,
        } => {
            field(out, "mesh");
            push_str(out, mesh);
            field(out, "peer");
            push_str(out, peer);
            field(out, "sig");
            push_str(out, &hex::encode(sig));
            field(out, "ts");
            push_u64(out, *ts);
        }
        ClientOp::Challenge => {}
        ClientOp::Send { r, to, body, key } => {
            field(out, "ref");
            push_u64(out, *r);
            field(out, "to");
            push_str(out, &to.to_wire());
            field(out, "body");
            out.extend_from_slice(&body.0);
            if let Some(k) = key {
                field(out, "key");
                push_str(out, k);
            }
        }
        ClientOp::Append { r, conv, body, key } => {
            field(out, "ref");
            push_u64(out, *r);
            field(out, "conv");
            push_str(out, conv);
            field(out, "body");
            out.extend_from_slice(&body.0);
            if let Some(k) = key {
                field(out, "key");
                push_str(out, k);
            }
        }
        ClientOp::Subscribe { r, conv, from } => {
            field(out, "ref");
            push_u64(out, *r);
            field(out, "conv");
            push_str(out, conv);
            field(out, "from");
            push_u64(out, *from);
        }
        ClientOp::Unsubscribe { r, conv } => {
            field(out, "ref");
            push_u64(out, *r);
            field(out, "conv");
            push_str(out, conv);
        }
        ClientOp::Ack { upto } => {
            field(out, "upto");
            push_u64(out, *upto);
        }
        ClientOp::Ping { r } => {
            field(out, "ref");
            push_u64(out, *r);
        }
        ClientOp::Options { r, batch } => {
            field(out, "ref");
            push_u64(out, *r);
            field(out, "batch");
            push_u64(out, u64::from(*batch));
        }
        ClientOp::Batch(ops) => {
            out.truncate(out.len() - b"{\"op\":\"batch\"".len());
            push_array(out, ops, encode_client_json);
            return;
        }
    }
    out.push(b'}');
}

pub fn encode_client_binary(op: &ClientOp) -> Vec<u8> {
    to_binary(op)
}

fn server_op_from_json(f: JsonFrame<'_>) -> Result<ServerOp, ProtoError> {
    let op =
        f.op.as_deref()
            .ok_or_else(|| ProtoError::bad_request("frame has no \"op\""))?;
    let peer_from = |f: &JsonFrame<'_>| -> Result<Arc<str>, ProtoError> {
        match &f.from {
            Some(FromField::Peer(p)) => Ok(Arc::from(p.as_ref())),
            _ => Err(missing(op, "from")),
        }
    };
    Ok(match op {
        "welcome" => ServerOp::Welcome {
            session: f.session.ok_or_else(|| missing(op, "session"))?,
            acked: f.acked.ok_or_else(|| missing(op, "acked"))?,
            head: f.head.ok_or_else(|| missing(op, "head"))?,
            nodes: match f.nodes {
                None => Vec::new(),
                Some(raw) => serde_json::from_str(raw.get()).map_err(|e| {
                    ProtoError::bad_request(format!("welcome's nodes is not a list of URLs: {e}"))
                })?,
            },
        },
        "ok" => ServerOp::Ok {
            r: f.r.ok_or_else(|| missing(op, "ref"))?,
            pos: f.pos,
            seq: f.seq,
        },
        "deliver" => ServerOp::Deliver {
            pos: f.pos.ok_or_else(|| missing(op, "pos"))?,
            from: peer_from(&f)?,
            to: Target::parse(f.to.as_deref().ok_or_else(|| missing(op, "to"))?)?,
            body: server_body_of(op, f.body)?,
            ts: f.ts.unwrap_or(0),
        },
        "event" => ServerOp::Event(DeliveredEvent {
            conv: f.conv.as_deref().ok_or_else(|| missing(op, "conv"))?.into(),
            seq: f.seq.ok_or_else(|| missing(op, "seq"))?,
            from: peer_from(&f)?,
            body: server_body_of(op, f.body)?,
            ts: f.ts.unwrap_or(0),
        }),
        "pong" => ServerOp::Pong {
            r: f.r.ok_or_else(|| missing(op, "ref"))?,
        },
        "challenge" => {
            let text = f.nonce.as_deref().ok_or_else(|| missing(op, "nonce"))?;
            let bytes = decode_hex_exact(op, "nonce", text, NONCE_BYTES)?;
            let mut nonce = [0u8; NONCE_BYTES];
            nonce.copy_from_slice(&bytes);
            ServerOp::Challenge { nonce }
        }
        "error" => {
            let code = f.code.as_deref().ok_or_else(|| missing(op, "code"))?;
            ServerOp::Error {
                r: f.r,
                code: ErrorCode::from_str_code(code)
                    .ok_or_else(|| ProtoError::bad_request(format!("unknown code {code:?}")))?,
                message: f.message.as_deref().unwrap_or_default().to_string(),
            }
        }
        other => return Err(ProtoError::bad_request(format!("unknown op {other:?}"))),
    })
}

/// Decodes one text frame from the server (used by clients).
pub fn decode_server_json(bytes: &[u8]) -> Result<Vec<ServerOp>, ProtoError> {
    json_frames(bytes)?
        .into_iter()
        .map(server_op_from_json)
        .collect()
}

/// Joins already-encoded server frames of one encoding into one batch frame: a JSON array of
/// them, or the postcard `ServerOp::Batch` (its variant index and length, then the frames as
/// they are: postcard values are self-delimiting). No frame is decoded or encoded again.
pub fn batch_server_frames(frames: &[Vec<u8>], binary: bool) -> Vec<u8> {
    let len: usize = frames.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(len + frames.len() + 12);
    if binary {
        push_varint(&mut out, SERVER_BATCH_VARIANT);
        push_varint(&mut out, frames.len() as u64);
        for f in frames {
            out.extend_from_slice(f);
        }
    } else {
        push_array(&mut out, frames, |f, out| out.extend_from_slice(f));
    }
    out
}

/// The postcard variant index of `ServerOp::Batch` (its place in the enum; pinned by a test).
const SERVER_BATCH_VARIANT: u64 = 6;

/// Postcard's unsigned varint (LEB128), as it encodes variant indices and lengths.
fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Decodes one binary frame from the server (a `Batch` is flattened; a nested one is refused
/// before any recursive decoding, as for client frames).
pub fn decode_server_binary(bytes: &[u8]) -> Result<Vec<ServerOp>, ProtoError> {
    decode_flat::<ServerOp>(bytes, SERVER_BATCH_VARIANT as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GroupId;

    fn body(s: &str) -> Body {
        Body::from_json_text(s.to_string()).unwrap()
    }

    fn client_ops() -> Vec<ClientOp> {
        vec![
            ClientOp::Hello {
                mesh: MeshId::must("m"),
                peer: PeerId::must("p"),
                token: "t\"x".into(),
            },
            ClientOp::Send {
                r: 1,
                to: Target::Group(GroupId::must("g")),
                body: body(r#"{"a":[1,2,"é"]}"#),
                key: None,
            },
            ClientOp::Append {
                r: 2,
                conv: ConvId::must("c"),
                body: body("\"hi\""),
                key: Some("k1".into()),
            },
            ClientOp::Subscribe {
                r: 3,
                conv: ConvId::must("c"),
                from: 7,
            },
            ClientOp::Unsubscribe {
                r: 4,
                conv: ConvId::must("c"),
            },
            ClientOp::Ack { upto: 9 },
            ClientOp::Ping { r: 5 },
            ClientOp::Challenge,
            ClientOp::HelloSigned {
                mesh: MeshId::must("m"),
                peer: PeerId::must("p"),
                sig: (0..64).collect(),
                ts: 1_700_000_000_000,
            },
            ClientOp::Options { r: 6, batch: 64 },
        ]
    }

    fn server_ops() -> Vec<ServerOp> {
        vec![
            ServerOp::Welcome {
                session: 1,
                acked: 2,
                head: 3,
                nodes: Vec::new(),
            },
            ServerOp::Welcome {
                session: 1,
                acked: 2,
                head: 3,
                nodes: vec!["http://10.0.0.1:7400".into(), "https://n2.example".into()],
            },
            ServerOp::Ok {
                r: 1,
                pos: Some(4),
                seq: None,
            },
            ServerOp::Ok {
                r: 1,
                pos: None,
                seq: None,
            },
            ServerOp::Deliver {
                pos: 4,
                from: "a".into(),
                to: Target::All,
                body: body("[true,null]"),
                ts: 99,
            },
            ServerOp::Event(DeliveredEvent {
                conv: "c".into(),
                seq: 1,
                from: "b".into(),
                body: body("1.5"),
                ts: 100,
            }),
            ServerOp::Pong { r: 8 },
            ServerOp::Challenge { nonce: [7; 32] },
            ServerOp::Error {
                r: None,
                code: ErrorCode::TooLarge,
                message: "big \"frame\"".into(),
            },
        ]
    }

    #[test]
    fn every_client_op_round_trips_in_json_and_binary() {
        // Proves both encodings of every client op decode to the same op.
        for op in client_ops() {
            let mut json = Vec::new();
            encode_client_json(&op, &mut json);
            assert_eq!(
                decode_client_json(&json).unwrap(),
                vec![op.clone()],
                "{op:?}"
            );
            assert_eq!(
                decode_client_binary(&encode_client_binary(&op)).unwrap(),
                vec![op]
            );
        }
        let batch = ClientOp::Batch(client_ops());
        let mut json = Vec::new();
        encode_client_json(&batch, &mut json);
        assert_eq!(decode_client_json(&json).unwrap(), client_ops());
        assert_eq!(
            decode_client_binary(&encode_client_binary(&batch)).unwrap(),
            client_ops()
        );
    }

    #[test]
    fn joined_server_frames_decode_as_the_ops_they_hold_in_order() {
        // Proves batch_server_frames builds a real batch frame in both encodings (a JSON array,
        // the postcard Batch variant) from frames encoded one by one, for small and large
        // counts (the length varint grows past one byte at 128).
        for n in [2usize, 3, 130, 1024] {
            let ops: Vec<ServerOp> = server_ops().into_iter().cycle().take(n).collect();
            let json: Vec<Vec<u8>> = ops
                .iter()
                .map(|op| {
                    let mut out = Vec::new();
                    encode_server_json(op, &mut out);
                    out
                })
                .collect();
            assert_eq!(
                decode_server_json(&batch_server_frames(&json, false)).unwrap(),
                ops
            );
            let binary: Vec<Vec<u8>> = ops.iter().map(encode_server_binary).collect();
            let joined = batch_server_frames(&binary, true);
            assert_eq!(decode_server_binary(&joined).unwrap(), ops);
            assert_eq!(joined, encode_server_binary(&ServerOp::Batch(ops.clone())));
        }
    }

    #[test]
    fn every_server_op_round_trips_in_json_and_binary() {
        // Proves both encodings of every server frame decode to the same frame.
        for op in server_ops() {
            let mut json = Vec::new();
            encode_server_json(&op, &mut json);
            let _: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(
                decode_server_json(&json).unwrap(),
                vec![op.clone()],
                "{op:?}"
            );
            assert_eq!(
                decode_server_binary(&encode_server_binary(&op)).unwrap(),
                vec![op]
            );
        }
    }

    #[test]
    fn the_documented_json_examples_decode() {
        // Proves the literal frames of docs/PROTOCOL.md parse as documented.
        let ops =
            decode_client_json(br#"{"op":"send","ref":1,"to":"*","body":{"text":"hi"}}"#).unwrap();
        assert_eq!(
            ops,
            vec![ClientOp::Send {
                r: 1,
                to: Target::All,
                body: body(r#"{"text":"hi"}"#),
                key: None,
            }]
        );
        let ops = decode_client_json(br#"{"op":"subscribe","ref":2,"conv":"c1","from":1,"x":0}"#);
        assert!(ops.is_ok(), "unknown fields are ignored");
    }

    #[test]
    fn malformed_frames_get_stable_codes() {
        // Proves each kind of bad input yields its documented code, never a panic.
        let cases: &[(&[u8], ErrorCode)] = &[
            (b"{not json", ErrorCode::BadRequest),
            (br#"{"op":"fly","ref":1}"#, ErrorCode::BadRequest),
            (br#"{"ref":1}"#, ErrorCode::BadRequest),
            (br#"{"op":"send","ref":1,"to":"*"}"#, ErrorCode::BadRequest),
            (
                br#"{"op":"append","ref":1,"body":1}"#,
                ErrorCode::BadRequest,
            ),
            (br#"{"op":"ack"}"#, ErrorCode::BadRequest),
            (
                br#"{"op":"send","ref":-1,"to":"*","body":1}"#,
                ErrorCode::BadRequest,
            ),
            (b"[]", ErrorCode::BadRequest),
        ];
        for (bytes, code) in cases {
            match decode_client_json(bytes) {
                Err(e) => assert_eq!(e.code, *code, "{}", String::from_utf8_lossy(bytes)),
                Ok(v) if v.is_empty() => {} // an empty batch is harmless
                Ok(v) => panic!("decoded {v:?}"),
            }
        }
        let long = format!(
            r#"{{"op":"append","ref":1,"conv":"{}","body":1}}"#,
            "c".repeat(200)
        );
        assert_eq!(
            decode_client_json(long.as_bytes()).unwrap_err().code,
            ErrorCode::TooLarge
        );
        assert!(decode_client_binary(&[0xff, 0xff, 0xff]).is_err());
        let bad_body = ClientOp::Send {
            r: 1,
            to: Target::All,
            body: Body::from_trusted(bytes::Bytes::from_static(b"{nope")),
            key: None,
        };
        assert!(decode_client_binary(&encode_client_binary(&bad_body)).is_err());
    }
}

#[cfg(test)]
mod hello_tests {
    use super::*;

    #[test]
    fn key_hellos_decode_and_bad_ones_are_refused() {
        // Proves a JSON hello with sig+ts is a signed hello, and a short sig, a missing ts or a
        // token beside a sig are bad requests.
        let sig = "ab".repeat(64);
        let ok = format!(r#"{{"op":"hello","mesh":"m","peer":"p","sig":"{sig}","ts":5}}"#);
        assert_eq!(
            decode_client_json(ok.as_bytes()).unwrap(),
            vec![ClientOp::HelloSigned {
                mesh: MeshId::must("m"),
                peer: PeerId::must("p"),
                sig: vec![0xab; 64],
                ts: 5
            }]
        );
        assert_eq!(
            decode_client_json(br#"{"op":"challenge"}"#).unwrap(),
            vec![ClientOp::Challenge]
        );
        let bad = [
            r#"{"op":"hello","mesh":"m","peer":"p","sig":"abcd","ts":5}"#.to_string(),
            format!(r#"{{"op":"hello","mesh":"m","peer":"p","sig":"{sig}"}}"#),
            format!(r#"{{"op":"hello","mesh":"m","peer":"p","sig":"{sig}","ts":5,"token":"t"}}"#),
            format!(
                r#"{{"op":"hello","mesh":"m","peer":"p","sig":"zz{}","ts":5}}"#,
                &sig[2..]
            ),
        ];
        for b in bad {
            assert_eq!(
                decode_client_json(b.as_bytes()).unwrap_err().code,
                ErrorCode::BadRequest,
                "{b}"
            );
        }
        let short = ClientOp::HelloSigned {
            mesh: MeshId::must("m"),
            peer: PeerId::must("p"),
            sig: vec![1; 10],
            ts: 5,
        };
        assert_eq!(
            decode_client_binary(&encode_client_binary(&short))
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        let mut json = Vec::new();
        encode_server_json(&ServerOp::Challenge { nonce: [0x0f; 32] }, &mut json);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            format!(r#"{{"op":"challenge","nonce":"{}"}}"#, "0f".repeat(32))
        );
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use crate::BODY_NESTING_MAX;

    /// `[7,1]` x n, then `[6,1]`: the frame of the pre-auth crash (issue 12), n nested batches.
    fn nested_client_batches(n: usize) -> Vec<u8> {
        let mut f = [7u8, 1].repeat(n);
        f.extend_from_slice(&[6, 1]);
        f
    }

    #[test]
    fn deeply_nested_binary_batches_are_refused_without_recursing() {
        // Proves the 12 KB frame of 6,000 nested `Batch` tags (which overflowed the stack in
        // postcard's recursive decoder) is a bad_request, in both directions, and so is one
        // level of nesting, also with a non-canonical tag encoding (0x87 0x00 is 7 to postcard).
        let frame = nested_client_batches(6000);
        assert_eq!(frame.len(), 12_002);
        let e = decode_client_binary(&frame).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
        assert!(e.message.contains("nest"), "{}", e.message);
        assert_eq!(
            decode_client_binary(&nested_client_batches(1)).unwrap(),
            vec![ClientOp::Ping { r: 1 }],
            "one batch holding a ping"
        );
        let e = decode_client_binary(&nested_client_batches(2)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("nest"), "{}", e.message);
        let e = decode_client_binary(&[0x87, 0x00, 1, 0x87, 0x00, 1, 6, 1]).unwrap_err();
        assert!(e.message.contains("nest"), "{}", e.message);
        // Server frames: `Batch` is 6; a pong is `[4, ref]`.
        let mut server = [6u8, 1].repeat(6000);
        server.extend_from_slice(&[4, 1]);
        let e = decode_server_binary(&server).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("nest"), "{}", e.message);
        assert_eq!(
            decode_server_binary(&[6, 2, 4, 1, 4, 2]).unwrap(),
            vec![ServerOp::Pong { r: 1 }, ServerOp::Pong { r: 2 }]
        );
    }

    #[test]
    fn the_batch_variant_indexes_are_pinned() {
        // Proves the hand-read batch tags are the enums' own: a one-op batch encodes as
        // `[tag, 1, op]` in each direction.
        let ping = ClientOp::Ping { r: 3 };
        assert_eq!(
            encode_client_binary(&ClientOp::Batch(vec![ping.clone()])),
            [
                vec![CLIENT_BATCH_VARIANT as u8, 1],
                encode_client_binary(&ping)
            ]
            .concat()
        );
        let pong = ServerOp::Pong { r: 3 };
        assert_eq!(
            encode_server_binary(&ServerOp::Batch(vec![pong.clone()])),
            [
                vec![SERVER_BATCH_VARIANT as u8, 1],
                encode_server_binary(&pong)
            ]
            .concat()
        );
    }

    #[test]
    fn a_welcome_keeps_its_bytes_on_a_single_node_and_names_the_nodes_as_variant_8() {
        // Proves the binary welcome is append-only: without nodes it is variant 0 with the
        // three varints clients already decode; with nodes it is variant 8, the same three
        // fields, then the list (count, then each URL as a string); JSON omits an empty list.
        let mut welcome = ServerOp::Welcome {
            session: 4,
            acked: 0,
            head: 0,
            nodes: Vec::new(),
        };
        assert_eq!(encode_server_binary(&welcome), [0, 4, 0, 0]);
        let mut json = Vec::new();
        encode_server_json(&welcome, &mut json);
        assert_eq!(json, br#"{"op":"welcome","session":4,"acked":0,"head":0}"#);
        welcome = ServerOp::Welcome {
            session: 4,
            acked: 0,
            head: 0,
            nodes: vec!["http://a:1".into()],
        };
        let mut expected = vec![8, 4, 0, 0, 1, 10];
        expected.extend_from_slice(b"http://a:1");
        assert_eq!(encode_server_binary(&welcome), expected);
        json.clear();
        encode_server_json(&welcome, &mut json);
        assert_eq!(
            json,
            br#"{"op":"welcome","session":4,"acked":0,"head":0,"nodes":["http://a:1"]}"#
        );
        let bad = br#"{"op":"welcome","session":4,"acked":0,"head":0,"nodes":[1]}"#;
        assert!(decode_server_json(bad).is_err(), "nodes must be strings");
    }

    #[test]
    fn truncated_and_oversize_batches_get_codes() {
        // Proves a batch length over BATCH_OPS_MAX is too_large before anything is allocated,
        // and truncated frames, bad varints and trailing bytes are bad requests.
        let mut big = vec![7u8];
        big.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(
            decode_client_binary(&big).unwrap_err().code,
            ErrorCode::TooLarge
        );
        for bad in [
            &[][..],
            &[7],
            &[7, 2, 6, 1],
            &[7, 1, 6, 1, 0],
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            &[0xff, 0xff, 0xff, 0xff, 0x1f],
        ] {
            assert_eq!(
                decode_client_binary(bad).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad:?}"
            );
        }
        assert_eq!(
            decode_client_binary(&[7, 2, 6, 1, 5, 9]).unwrap(),
            vec![ClientOp::Ping { r: 1 }, ClientOp::Ack { upto: 9 }]
        );
    }

    #[test]
    fn deeply_nested_json_is_refused_not_a_crash() {
        // Proves deep JSON nesting, as a whole frame, as a batch element, or inside a body (JSON
        // or binary), is a bad_request from serde_json's recursion limit, never a stack
        // overflow, and that a moderately nested body still passes.
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        for frame in [
            "[".repeat(100_000),
            deep(100_000),
            format!("[{}]", "{\"a\":".repeat(50_000)),
            format!(
                r#"{{"op":"send","ref":1,"to":"*","body":{}}}"#,
                deep(100_000)
            ),
            format!(
                r#"[{{"op":"send","ref":1,"to":"*","body":{}}}]"#,
                deep(100_000)
            ),
        ] {
            let e = decode_client_json(frame.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
            assert!(decode_server_json(frame.as_bytes()).is_err());
        }
        let binary = ClientOp::Send {
            r: 1,
            to: Target::All,
            body: Body::from_trusted(deep(100_000).into()),
            key: None,
        };
        let e = decode_client_binary(&encode_client_binary(&binary)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        // The limit is exact, in both encodings; brackets inside strings do not count.
        let max = BODY_NESTING_MAX;
        let frame = |d: usize| format!(r#"{{"op":"send","ref":1,"to":"*","body":{}}}"#, deep(d));
        assert!(decode_client_json(frame(max).as_bytes()).is_ok());
        assert!(decode_client_json(frame(max + 1).as_bytes()).is_err());
        assert!(Body::from_json_text(deep(max)).is_ok());
        assert!(Body::from_json_text(deep(max + 1)).is_err());
        let strings = format!("[{}]", r#""[[{\"[","#.repeat(1000) + "1");
        assert!(Body::from_json_text(strings.clone()).is_ok(), "{strings}");
        // The whole frame a session delivers a deepest body in still parses with serde_json.
        let mut out = Vec::new();
        let deliver = ServerOp::Deliver {
            pos: 1,
            from: "a".into(),
            to: Target::All,
            body: Body::from_json_text(deep(max)).unwrap(),
            ts: 1,
        };
        encode_server_json(&ServerOp::Batch(vec![deliver]), &mut out);
        serde_json::from_slice::<serde_json::Value>(&out).unwrap();
    }

    #[test]
    fn bodies_must_be_utf8_json_in_both_encodings() {
        // Proves a binary body that is JSON to serde_json's validator but not UTF-8 (a quoted
        // 0xff byte: issue 12's acknowledged `"\xff"`) is a bad_request, as is the same in a
        // JSON frame; valid UTF-8 and odd but valid JSON (huge exponents, lone surrogate
        // escapes) pass byte for byte.
        for bad in [
            &b"\"\xff\""[..],
            b"\xff",
            b"\"\xc3\"",
            b"[\"\xed\xa0\x80\"]",
        ] {
            let op = ClientOp::Send {
                r: 1,
                to: Target::All,
                body: Body::from_trusted(bytes::Bytes::copy_from_slice(bad)),
                key: None,
            };
            let e = decode_client_binary(&encode_client_binary(&op)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
            assert!(Body::from_json_text(bad.to_vec()).is_err());
            let mut frame = br#"{"op":"send","ref":1,"to":"*","body":"#.to_vec();
            frame.extend_from_slice(bad);
            frame.push(b'}');
            assert_eq!(
                decode_client_json(&frame).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad:?}"
            );
        }
        for good in [
            "\"é\"",
            "1e999999",
            r#""\ud800""#,
            "123456789012345678901234567890",
        ] {
            let body = Body::from_json_text(good.to_string()).unwrap();
            let op = ClientOp::Append {
                r: 1,
                conv: ConvId::must("c"),
                body: body.clone(),
                key: None,
            };
            assert_eq!(
                decode_client_binary(&encode_client_binary(&op)).unwrap(),
                vec![op.clone()]
            );
            let mut json = Vec::new();
            encode_client_json(&op, &mut json);
            assert_eq!(decode_client_json(&json).unwrap(), vec![op], "{good}");
        }
    }
}
