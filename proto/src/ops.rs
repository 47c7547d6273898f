//! The frames of the client protocol. docs/PROTOCOL.md is the contract; these types are its
//! Rust form. The derives give the postcard (binary) encoding, whose variant order is therefore
//! part of the wire format: append new variants and fields at the end only.

use crate::{ConvId, ErrorCode, MeshId, PeerId, Target};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A message body: the UTF-8 text of one JSON value, validated when it entered the node.
/// It is stored and forwarded as it arrived, never re-parsed, and shared (not copied) by fanout.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body(pub Bytes);

impl Body {
    /// Wraps JSON text after checking that it is UTF-8 text of exactly one valid JSON value.
    ///
    /// UTF-8 is checked first, over the whole body: serde_json skips the bytes inside strings
    /// without decoding them when it only validates, so `"\xff"` (a quoted 0xff byte) would
    /// pass as JSON and then break every JSON frame and HTTP page it is spliced into.
    pub fn from_json_text(text: impl Into<Bytes>) -> Result<Body, crate::ProtoError> {
        let bytes: Bytes = text.into();
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| crate::ProtoError::bad_request(format!("body is not UTF-8 text: {e}")))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| crate::ProtoError::bad_request(format!("body is not valid JSON: {e}")))?;
        check_nesting(&bytes)?;
        Ok(Body(bytes))
    }

    /// Wraps the text of one JSON value that a JSON parser already validated (a raw value
    /// borrowed from a frame or an HTTP body): only the nesting limit is left to check.
    pub fn from_parsed_json(text: &str) -> Result<Body, crate::ProtoError> {
        check_nesting(text.as_bytes())?;
        Ok(Body(Bytes::copy_from_slice(text.as_bytes())))
    }

    /// The body as text, if it is UTF-8 (every body validated since bodies are checked for it;
    /// data written by an older node may not be, and can then not be sent as JSON).
    pub fn to_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// For bodies already validated (read back from the WAL, or produced by `serde_json`).
    pub fn from_trusted(bytes: Bytes) -> Body {
        Body(bytes)
    }

    pub fn as_str(&self) -> &str {
        // Validated as JSON (hence UTF-8) on the way in.
        std::str::from_utf8(&self.0).unwrap_or("null")
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks that JSON text nests arrays and objects at most [`BODY_NESTING_MAX`] deep.
///
/// serde_json validates a raw or ignored value without a depth limit, so a 12 KB body of
/// `[[[[…` would be stored and then break every recipient whose parser recurses (serde_json
/// stops at 128 levels, counting the frame's own object). Counting brackets is vectorised and
/// settles almost every body; only a body with more brackets than the limit is walked, outside
/// strings, to find its real depth.
fn check_nesting(json: &[u8]) -> Result<(), crate::ProtoError> {
    let brackets = json.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if brackets <= crate::BODY_NESTING_MAX {
        return Ok(());
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > crate::BODY_NESTING_MAX {
                    return Err(crate::ProtoError::bad_request(format!(
                        "body nests arrays and objects more than {} deep",
                        crate::BODY_NESTING_MAX
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body({})", self.as_str())
    }
}

/// A frame from a client. `r` is the client-chosen `ref` echoed in the answer.
///
/// Its binary form is [`WireClientOp`]'s: the same variants at the same indexes, except that a
/// `send` with a key travels as a variant of its own at the end (binary encoding is
/// append-only, and a field added to variant 1 would break clients that send it without).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WireClientOp", into = "WireClientOp")]
pub enum ClientOp {
    Hello {
        mesh: MeshId,
        peer: PeerId,
        token: String,
    },
    Send {
        r: u64,
        to: Target,
        body: Body,
        /// Idempotency key, scoped to the sending peer.
        key: Option<Arc<str>>,
    },
    Append {
        r: u64,
        conv: ConvId,
        body: Body,
        key: Option<Arc<str>>,
    },
    Subscribe {
        r: u64,
        conv: ConvId,
        from: u64,
    },
    Unsubscribe {
        r: u64,
        conv: ConvId,
    },
    Ack {
        upto: u64,
    },
    Ping {
        r: u64,
    },
    /// Binary frames only: several ops in one frame (JSON uses a top-level array instead).
    Batch(Vec<ClientOp>),
    /// Asks for this session's hello nonce (answered with [`ServerOp::Challenge`]); the first
    /// step of a key hello.
    Challenge,
    /// Hello proven with the peer's ed25519 key instead of a token: `sig` (64 bytes) signs
    /// [`crate::hello::hello_message`] of mesh, peer, `ts` (unix ms) and this session's nonce.
    /// In JSON it is a `hello` frame with `sig` and `ts` instead of `token`.
    HelloSigned {
        mesh: MeshId,
        peer: PeerId,
        sig: Vec<u8>,
        ts: u64,
    },
    /// Session options, valid at any point of a session (before hello too); answered with
    /// `ok`. `batch`: the most server ops the client takes in one frame (a JSON array or a
    /// binary `Batch`); 0 or 1 keeps one op per frame, the default.
    Options {
        r: u64,
        batch: u32,
    },
}

/// [`ClientOp`] as postcard writes it (variant indexes are the wire tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireClientOp {
    Hello {
        mesh: MeshId,
        peer: PeerId,
        token: String,
    },
    Send {
        r: u64,
        to: Target,
        body: Body,
    },
    Append {
        r: u64,
        conv: ConvId,
        body: Body,
        key: Option<Arc<str>>,
    },
    Subscribe {
        r: u64,
        conv: ConvId,
        from: u64,
    },
    Unsubscribe {
        r: u64,
        conv: ConvId,
    },
    Ack {
        upto: u64,
    },
    Ping {
        r: u64,
    },
    Batch(Vec<ClientOp>),
    Challenge,
    HelloSigned {
        mesh: MeshId,
        peer: PeerId,
        sig: Vec<u8>,
        ts: u64,
    },
    Options {
        r: u64,
        batch: u32,
    },
    /// A `send` with an idempotency key (index 11).
    SendKeyed {
        r: u64,
        to: Target,
        body: Body,
        key: Arc<str>,
    },
}

impl From<ClientOp> for WireClientOp {
    fn from(op: ClientOp) -> WireClientOp {
        use WireClientOp as W;
        match op {
            ClientOp::Hello { mesh, peer, token } => W::Hello { mesh, peer, token },
            ClientOp::Send { r, to, body, key } => match key {
                None => W::Send { r, to, body },
                Some(key) => W::SendKeyed { r, to, body, key },
            },
            ClientOp::Append { r, conv, body, key } => W::Append { r, conv, body, key },
            ClientOp::Subscribe { r, conv, from } => W::Subscribe { r, conv, from },
            ClientOp::Unsubscribe { r, conv } => W::Unsubscribe { r, conv },
            ClientOp::Ack { upto } => W::Ack { upto },
            ClientOp::Ping { r } => W::Ping { r },
            ClientOp::Batch(ops) => W::Batch(ops),
            ClientOp::Challenge => W::Challenge,
            ClientOp::HelloSigned {
                mesh,
                peer,
                sig,
                ts,
            } => W::HelloSigned {
                mesh,
                peer,
                sig,
                ts,
            },
            ClientOp::Options { r, batch } => W::Options { r, batch },
        }
    }
}

impl From<WireClientOp> for ClientOp {
    fn from(op: WireClientOp) -> ClientOp {
        use WireClientOp as W;
        match op {
            W::Hello { mesh, peer, token } => ClientOp::Hello { mesh, peer, token },
            W::Send { r, to, body } => ClientOp::Send {
                r,
                to,
                body,
                key: None,
            },
            W::SendKeyed { r, to, body, key } => ClientOp::Send {
                r,
                to,
                body,
                key: Some(key),
            },
            W::Append { r, conv, body, key } => ClientOp::Append { r, conv, body, key },
            W::Subscribe { r, conv, from } => ClientOp::Subscribe { r, conv, from },
            W::Unsubscribe { r, conv } => ClientOp::Unsubscribe { r, conv },
            W::Ack { upto } => ClientOp::Ack { upto },
            W::Ping { r } => ClientOp::Ping { r },
            W::Batch(ops) => ClientOp::Batch(ops),
            W::Challenge => ClientOp::Challenge,
            W::HelloSigned {
                mesh,
                peer,
                sig,
                ts,
            } => ClientOp::HelloSigned {
                mesh,
                peer,
                sig,
                ts,
            },
            W::Options { r, batch } => ClientOp::Options { r, batch },
        }
    }
}

impl ClientOp {
    pub fn name(&self) -> &'static str {
        match self {
            ClientOp::Hello { .. } => "hello",
            ClientOp::Send { .. } => "send",
            ClientOp::Append { .. } => "append",
            ClientOp::Subscribe { .. } => "subscribe",
            ClientOp::Unsubscribe { .. } => "unsubscribe",
            ClientOp::Ack { .. } => "ack",
            ClientOp::Ping { .. } => "ping",
            ClientOp::Batch(_) => "batch",
            ClientOp::Challenge => "challenge",
            ClientOp::HelloSigned { .. } => "hello",
            ClientOp::Options { .. } => "options",
        }
    }

    /// The client's `ref`, for ops that carry one.
    pub fn reference(&self) -> Option<u64> {
        match self {
            ClientOp::Send { r, .. }
            | ClientOp::Append { r, .. }
            | ClientOp::Subscribe { r, .. }
            | ClientOp::Unsubscribe { r, .. }
            | ClientOp::Ping { r }
            | ClientOp::Options { r, .. } => Some(*r),
            ClientOp::Hello { .. }
            | ClientOp::HelloSigned { .. }
            | ClientOp::Challenge
            | ClientOp::Ack { .. }
            | ClientOp::Batch(_) => None,
        }
    }
}

/// One conversation entry as replayed or tailed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredEvent {
    pub conv: Arc<str>,
    pub seq: u64,
    pub from: Arc<str>,
    pub body: Body,
    pub ts: u64,
}

/// A frame from the server.
///
/// Its binary form is [`WireServerOp`]'s: the same variants at the same indexes, except that a
/// `welcome` with a node list travels as a variant of its own at the end (`WelcomeNodes`,
/// index 8), so a single node's `welcome` keeps the bytes clients already decode.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "WireServerOp")]
pub enum ServerOp {
    Welcome {
        session: u64,
        acked: u64,
        head: u64,
        /// The cluster's client base URLs (`http://host:port`), this node's among them, in
        /// node id order; empty on a single node (then not sent).
        nodes: Vec<Arc<str>>,
    },
    /// The acknowledgement of a durable request: `pos` for send, `seq` for append.
    Ok {
        r: u64,
        pos: Option<u64>,
        seq: Option<u64>,
    },
    Deliver {
        pos: u64,
        from: Arc<str>,
        to: Target,
        body: Body,
        ts: u64,
    },
    Event(DeliveredEvent),
    Pong {
        r: u64,
    },
    Error {
        r: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    /// Binary frames only: several frames in one.
    Batch(Vec<ServerOp>),
    /// The answer to `challenge`: the nonce a key hello on this session must sign. It is
    /// single-use and belongs to this session only.
    Challenge {
        nonce: [u8; 32],
    },
}

/// [`ServerOp`] as postcard reads it (variant indexes are the wire tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireServerOp {
    Welcome {
        session: u64,
        acked: u64,
        head: u64,
    },
    Ok {
        r: u64,
        pos: Option<u64>,
        seq: Option<u64>,
    },
    Deliver {
        pos: u64,
        from: Arc<str>,
        to: Target,
        body: Body,
        ts: u64,
    },
    Event(DeliveredEvent),
    Pong {
        r: u64,
    },
    Error {
        r: Option<u64>,
        code: ErrorCode,
        message: String,
    },
    Batch(Vec<ServerOp>),
    Challenge {
        nonce: [u8; 32],
    },
    /// A `welcome` naming the cluster's nodes (index 8).
    WelcomeNodes {
        session: u64,
        acked: u64,
        head: u64,
        nodes: Vec<Arc<str>>,
    },
}

/// [`WireServerOp`] borrowing from a [`ServerOp`]: the same variants, indexes and field
/// order, so encoding a frame (the hot path of every delivery) copies nothing first.
#[derive(Serialize)]
#[serde(rename = "WireServerOp")]
enum WireServerOpRef<'a> {
    Welcome {
        session: u64,
        acked: u64,
        head: u64,
    },
    Ok {
        r: u64,
        pos: Option<u64>,
        seq: Option<u64>,
    },
    Deliver {
        pos: u64,
        from: &'a str,
        to: &'a Target,
        body: &'a Body,
        ts: u64,
    },
    Event(&'a DeliveredEvent),
    Pong {
        r: u64,
    },
    Error {
        r: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
    Batch(&'a [ServerOp]),
    Challenge {
        nonce: &'a [u8; 32],
    },
    WelcomeNodes {
        session: u64,
        acked: u64,
        head: u64,
        nodes: &'a [Arc<str>],
    },
}

impl Serialize for ServerOp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use WireServerOpRef as W;
        let wire = match self {
            ServerOp::Welcome {
                session,
                acked,
                head,
                nodes,
            } if nodes.is_empty() => W::Welcome {
                session: *session,
                acked: *acked,
                head: *head,
            },
            ServerOp::Welcome {
                session,
                acked,
                head,
                nodes,
            } => W::WelcomeNodes {
                session: *session,
                acked: *acked,
                head: *head,
                nodes,
            },
            ServerOp::Ok { r, pos, seq } => W::Ok {
                r: *r,
                pos: *pos,
                seq: *seq,
            },
            ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ts,
            } => W::Deliver {
                pos: *pos,
                from,
                to,
                body,
                ts: *ts,
            },
            ServerOp::Event(e) => W::Event(e),
            ServerOp::Pong { r } => W::Pong { r: *r },
            ServerOp::Error { r, code, message } => W::Error {
                r: *r,
                code: *code,
                message,
            },
            ServerOp::Batch(ops) => W::Batch(ops),
            ServerOp::Challenge { nonce } => W::Challenge { nonce },
        };
        wire.serialize(s)
    }
}

impl From<WireServerOp> for ServerOp {
    fn from(op: WireServerOp) -> ServerOp {
        use WireServerOp as W;
        match op {
            W::Welcome {
                session,
                acked,
                head,
            } => ServerOp::Welcome {
                session,
                acked,
                head,
                nodes: Vec::new(),
            },
            W::WelcomeNodes {
                session,
                acked,
                head,
                nodes,
            } => ServerOp::Welcome {
                session,
                acked,
                head,
                nodes,
            },
            W::Ok { r, pos, seq } => ServerOp::Ok { r, pos, seq },
            W::Deliver {
                pos,
                from,
                to,
                body,
                ts,
            } => ServerOp::Deliver {
                pos,
                from,
                to,
                body,
                ts,
            },
            W::Event(e) => ServerOp::Event(e),
            W::Pong { r } => ServerOp::Pong { r },
            W::Error { r, code, message } => ServerOp::Error { r, code, message },
            W::Batch(ops) => ServerOp::Batch(ops),
            W::Challenge { nonce } => ServerOp::Challenge { nonce },
        }
    }
}

impl ServerOp {
    pub fn error(r: Option<u64>, e: crate::ProtoError) -> ServerOp {
        ServerOp::Error {
            r,
            code: e.code,
            message: e.message,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ServerOp::Welcome { .. } => "welcome",
            ServerOp::Ok { .. } => "ok",
            ServerOp::Deliver { .. } => "deliver",
            ServerOp::Event(_) => "event",
            ServerOp::Pong { .. } => "pong",
            ServerOp::Error { .. } => "error",
            ServerOp::Batch(_) => "batch",
            ServerOp::Challenge { .. } => "challenge",
        }
    }
}
