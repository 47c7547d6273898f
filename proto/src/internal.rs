//! Messages inside a node: from a session (edge) or the HTTP API, through the router, to the
//! shard that owns the key, and the replies back. They never cross the wire to clients; they are
//! serde-capable so that later replication and the simulator can carry them.

use crate::{Body, ConvId, DeliveredEvent, ErrorCode, GroupId, MeshId, PeerId, ServerOp, Target};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A session (WebSocket connection, QUIC connection, or one HTTP request) on this node.
pub type SessionId = u64;
/// Index of a shard on this node, `0..shards`.
pub type ShardIdx = u32;

/// Most subscriptions one [`ShardOp::Attach`] names: a session's own limit
/// (`session_subscriptions_max`) is at most this.
pub const ATTACH_SUBS_MAX: usize = 65_536;

/// Which key a request is placed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement<'a> {
    /// Inbox traffic, peers and mesh metadata: by mesh id.
    Mesh(&'a str),
    /// Conversation traffic: by (mesh, conversation).
    Conversation(&'a str, &'a str),
    /// Session lifecycle messages go to every shard.
    Broadcast,
}

/// One request for a shard. `r` is the reference the reply carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub session: SessionId,
    pub op: ShardOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardOp {
    /// Admin: create a mesh. Replies `Ok` once durable, `Error(conflict)` if it exists.
    CreateMesh {
        r: u64,
        mesh: MeshId,
    },
    /// Admin: add a peer with the SHA-256 of its token, its ed25519 public key, or both (at
    /// least one). Replies `Ok` once durable.
    AddPeer {
        r: u64,
        mesh: MeshId,
        peer: PeerId,
        groups: Vec<GroupId>,
        token_hash: Option<[u8; 32]>,
        public_key: Option<[u8; 32]>,
    },
    /// Authenticate a session as `peer` and attach it as a receiver of the peer's inbox: by
    /// `token`, or, when `proof` is set, by the peer's key (then `token` is empty).
    /// Replies `Welcome` or `Error(unauthorized)`.
    Hello {
        mesh: MeshId,
        peer: PeerId,
        token: String,
        proof: Option<HelloProof>,
    },
    /// Authenticate a bearer token of the mesh without attaching (HTTP). Replies `Authed`.
    Auth {
        r: u64,
        mesh: MeshId,
        token: String,
        /// For a `?consistency=local` read: any replica answers from what it applied.
        local: bool,
    },
    /// Store an inbox message; replies `Ok{pos}` once durable.
    Send {
        r: u64,
        mesh: MeshId,
        from: PeerId,
        to: Target,
        body: Body,
        /// Idempotency key, scoped to `from`.
        key: Option<Arc<str>>,
    },
    /// Append to a conversation; replies `Ok{seq}` once durable.
    Append {
        r: u64,
        mesh: MeshId,
        conv: ConvId,
        from: PeerId,
        body: Body,
        key: Option<Arc<str>>,
    },
    /// Replay a conversation from `from`, then tail it live.
    Subscribe {
        r: u64,
        mesh: MeshId,
        conv: ConvId,
        from: u64,
    },
    Unsubscribe {
        r: u64,
        mesh: MeshId,
        conv: ConvId,
    },
    /// Read one page of a conversation (HTTP). Replies `Messages`.
    Read {
        r: u64,
        mesh: MeshId,
        conv: ConvId,
        from: u64,
        limit: u32,
        /// `?consistency=local`: the receiving node's replica answers from its committed
        /// entries (which may lag); otherwise the leader answers after a quorum round.
        local: bool,
    },
    /// Move the peer's durable inbox cursor. No reply.
    Ack {
        mesh: MeshId,
        peer: PeerId,
        upto: u64,
    },
    /// The session wrote `frames` frames pushed by this shard to its socket: push credit returns.
    Flushed {
        frames: u32,
    },
    /// The session is gone: detach it from everything in this shard. No reply.
    Closed,
    /// Attach again a session its node already authenticated, after the shard's leader
    /// changed and the new one does not know it: the inbox of `peer` (when `inbox_after` is
    /// set) from after the highest `pos` the session handed its client, and each subscription
    /// in `subs` from the next seq it has not handed out. Whatever the shard held for the
    /// session is replaced. Replies [`Reply::Attached`]. Only a node makes it (never a client),
    /// so it proves no token: the node vouches for the hello it checked.
    Attach {
        mesh: MeshId,
        peer: PeerId,
        inbox_after: Option<u64>,
        subs: Vec<(ConvId, u64)>,
        /// Echoed in the answer: the session takes only its latest attach's.
        attempt: u64,
    },
}

impl ShardOp {
    /// Checks what deserializing does not: every id, key and body of an op that arrived as
    /// bytes from another node (a forwarded request), as the binary client codec checks a
    /// client's. One exhaustive match: a new op must say what it carries.
    pub fn check_wire(&self) -> Result<(), crate::ProtoError> {
        use crate::ids::{validate_id, validate_key, IdKind};
        let key = |k: &Option<Arc<str>>| k.as_deref().map_or(Ok(()), validate_key);
        let body =
            |b: &crate::Body| crate::Body::from_json_text(b.as_str().to_string()).map(|_| ());
        match self {
            ShardOp::CreateMesh { mesh, .. } | ShardOp::Auth { mesh, .. } => {
                validate_id(IdKind::Mesh, mesh.as_str())
            }
            ShardOp::AddPeer {
                mesh, peer, groups, ..
            } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Peer, peer.as_str())?;
                groups
                    .iter()
                    .try_for_each(|g| validate_id(IdKind::Group, g.as_str()))
            }
            ShardOp::Hello {
                mesh, peer, proof, ..
            } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Peer, peer.as_str())?;
                match proof {
                    Some(p) if p.sig.len() != 64 => Err(crate::ProtoError::bad_request(
                        "a forwarded hello's signature is not 64 bytes",
                    )),
                    _ => Ok(()),
                }
            }
            ShardOp::Send {
                mesh,
                from,
                to,
                body: b,
                key: k,
                ..
            } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Peer, from.as_str())?;
                match to {
                    crate::Target::Peer(p) => validate_id(IdKind::Peer, p.as_str())?,
                    crate::Target::Group(g) => validate_id(IdKind::Group, g.as_str())?,
                    crate::Target::All => {}
                }
                key(k)?;
                body(b)
            }
            ShardOp::Append {
                mesh,
                conv,
                from,
                body: b,
                key: k,
                ..
            } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Conversation, conv.as_str())?;
                validate_id(IdKind::Peer, from.as_str())?;
                key(k)?;
                body(b)
            }
            ShardOp::Subscribe { mesh, conv, .. }
            | ShardOp::Unsubscribe { mesh, conv, .. }
            | ShardOp::Read { mesh, conv, .. } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Conversation, conv.as_str())
            }
            ShardOp::Ack { mesh, peer, .. } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Peer, peer.as_str())
            }
            ShardOp::Flushed { .. } | ShardOp::Closed => Ok(()),
            ShardOp::Attach {
                mesh, peer, subs, ..
            } => {
                validate_id(IdKind::Mesh, mesh.as_str())?;
                validate_id(IdKind::Peer, peer.as_str())?;
                if subs.len() > ATTACH_SUBS_MAX {
                    return Err(crate::ProtoError::new(
                        crate::ErrorCode::TooLarge,
                        format!(
                            "an attach names {} subscriptions; the most is {ATTACH_SUBS_MAX}",
                            subs.len()
                        ),
                    ));
                }
                subs.iter()
                    .try_for_each(|(c, _)| validate_id(IdKind::Conversation, c.as_str()))
            }
        }
    }

    /// The key this op is placed by.
    pub fn placement(&self) -> Placement<'_> {
        match self {
            ShardOp::CreateMesh { mesh, .. }
            | ShardOp::AddPeer { mesh, .. }
            | ShardOp::Hello { mesh, .. }
            | ShardOp::Auth { mesh, .. }
            | ShardOp::Send { mesh, .. }
            | ShardOp::Ack { mesh, .. }
            | ShardOp::Attach { mesh, .. } => Placement::Mesh(mesh),
            ShardOp::Append { mesh, conv, .. }
            | ShardOp::Subscribe { mesh, conv, .. }
            | ShardOp::Unsubscribe { mesh, conv, .. }
            | ShardOp::Read { mesh, conv, .. } => Placement::Conversation(mesh, conv),
            ShardOp::Flushed { .. } | ShardOp::Closed => Placement::Broadcast,
        }
    }

    /// The `ref` the op is answered with, if it is answered at all.
    pub fn reference(&self) -> Option<u64> {
        match self {
            ShardOp::CreateMesh { r, .. }
            | ShardOp::AddPeer { r, .. }
            | ShardOp::Auth { r, .. }
            | ShardOp::Send { r, .. }
            | ShardOp::Append { r, .. }
            | ShardOp::Subscribe { r, .. }
            | ShardOp::Unsubscribe { r, .. }
            | ShardOp::Read { r, .. } => Some(*r),
            ShardOp::Hello { .. }
            | ShardOp::Ack { .. }
            | ShardOp::Flushed { .. }
            | ShardOp::Closed
            | ShardOp::Attach { .. } => None,
        }
    }

    /// Whether any replica may answer the op from what it applied (a `?consistency=local`
    /// read and its authentication): never forwarded to the leader.
    pub fn is_local_read(&self) -> bool {
        matches!(
            self,
            ShardOp::Auth { local: true, .. } | ShardOp::Read { local: true, .. }
        )
    }

    /// Whether the op proposes a WAL record (and so is refused while the shard cannot write).
    /// A cursor move (`Ack`) is logged too, but coalesced per group commit and never refused:
    /// it only frees space.
    pub fn is_write(&self) -> bool {
        match self {
            ShardOp::CreateMesh { .. }
            | ShardOp::AddPeer { .. }
            | ShardOp::Send { .. }
            | ShardOp::Append { .. } => true,
            ShardOp::Hello { .. }
            | ShardOp::Auth { .. }
            | ShardOp::Subscribe { .. }
            | ShardOp::Unsubscribe { .. }
            | ShardOp::Read { .. }
            | ShardOp::Ack { .. }
            | ShardOp::Flushed { .. }
            | ShardOp::Closed
            | ShardOp::Attach { .. } => false,
        }
    }
}

/// A key hello's proof, as the session forwards it: the client's signature and timestamp, and
/// the nonce the *session* issued (never one the client named). The shard verifies `sig` over
/// [`crate::hello::hello_message`] with the peer's stored public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloProof {
    /// 64 bytes (checked by the codec).
    pub sig: Vec<u8>,
    /// The client's clock, unix ms.
    pub ts: u64,
    pub nonce: [u8; 32],
}

/// What a shard says to one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A frame for the client as it is (welcome, ok, error, deliver, event).
    Frame(ServerOp),
    /// `Auth` succeeded: the token belongs to `peer`.
    Authed { r: u64, peer: Arc<str> },
    /// One page of a conversation; `head` is the last seq the conversation has.
    Messages {
        r: u64,
        events: Vec<DeliveredEvent>,
        head: u64,
    },
    /// The answer to [`ShardOp::Attach`]: `None` when the session is attached again, else why
    /// not (`unavailable`: no leader here, try again; `unauthorized`: the peer is gone).
    Attached {
        attempt: u64,
        refused: Option<(ErrorCode, String)>,
    },
}

impl Reply {
    /// Frames the shard pushed unasked (deliveries and events) use push credit.
    pub fn is_push(&self) -> bool {
        matches!(
            self,
            Reply::Frame(ServerOp::Deliver { .. }) | Reply::Frame(ServerOp::Event(_))
        )
    }
}

/// A reply addressed to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub session: SessionId,
    pub reply: Reply,
}

/// Where a session's request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the shard that owns the op's key ([`ShardOp::placement`]).
    ByKey,
    /// To one shard (push credit goes back to the shard that pushed).
    Shard(ShardIdx),
    /// To every shard (session closed).
    AllShards,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An op as another node would send it: postcard, ids as plain strings.
    fn from_wire(op: &ShardOp) -> ShardOp {
        let bytes = postcard::to_allocvec(op).expect("encodes");
        postcard::from_bytes(&bytes).expect("decodes")
    }

    #[test]
    fn a_forwarded_op_with_a_bad_id_key_or_body_is_refused() {
        // Proves deserializing a forwarded op does not validate it, and `check_wire` refuses
        // each kind of bad field while taking a good op.
        let good = ShardOp::Append {
            r: 1,
            mesh: MeshId::must("m"),
            conv: ConvId::must("c"),
            from: PeerId::must("a"),
            body: Body::from_json_text("{\"x\":1}").expect("json"),
            key: Some("k".into()),
        };
        assert!(from_wire(&good).check_wire().is_ok());
        let mut bytes = postcard::to_allocvec(&good).expect("encodes");
        // The mesh id is the first string: its length byte, then "m". Make it a space.
        let at = bytes.iter().position(|b| *b == b'm').expect("the mesh id");
        bytes[at] = b' ';
        let bad: ShardOp = postcard::from_bytes(&bytes).expect("postcard takes any string");
        assert!(bad.check_wire().is_err(), "a bad mesh id");
        let ShardOp::Append {
            mesh, conv, from, ..
        } = good.clone()
        else {
            unreachable!()
        };
        let bad_key = ShardOp::Append {
            r: 1,
            mesh: mesh.clone(),
            conv,
            from: from.clone(),
            body: Body::from_json_text("1").expect("json"),
            key: Some("".into()),
        };
        assert!(from_wire(&bad_key).check_wire().is_err(), "an empty key");
        let not_json = ShardOp::Send {
            r: 2,
            mesh,
            from,
            to: Target::All,
            body: Body::from_json_text("1").expect("json"),
            key: None,
        };
        let mut bytes = postcard::to_allocvec(&not_json).expect("encodes");
        let last = bytes.len() - 2; // the body "1" is the byte before the key's None
        assert_eq!(bytes[last], b'1');
        bytes[last] = b'{';
        let bad: ShardOp = postcard::from_bytes(&bytes).expect("postcard takes any bytes");
        assert!(bad.check_wire().is_err(), "a body that is not JSON");
    }
}
