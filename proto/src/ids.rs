//! Identifiers and send targets, and the rules that make them safe to log, hash and store.

use crate::{ErrorCode, ProtoError, ID_BYTES_MAX, KEY_BYTES_MAX};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Mesh,
    Peer,
    Group,
    Conversation,
}

impl IdKind {
    fn name(self) -> &'static str {
        match self {
            IdKind::Mesh => "mesh",
            IdKind::Peer => "peer",
            IdKind::Group => "group",
            IdKind::Conversation => "conversation",
        }
    }
}

/// Ids are 1..=128 bytes of `[A-Za-z0-9._:@-]`. The restricted alphabet keeps ids safe in URLs,
/// file names and log lines; `*` and the `group:` prefix are reserved for send targets.
pub fn validate_id(kind: IdKind, s: &str) -> Result<(), ProtoError> {
    if s.is_empty() {
        return Err(ProtoError::bad_request(format!(
            "{} id is empty",
            kind.name()
        )));
    }
    if s.len() > ID_BYTES_MAX {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!(
                "{} id is {} bytes; the limit is {ID_BYTES_MAX}",
                kind.name(),
                s.len()
            ),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(ProtoError::bad_request(format!(
            "{} id contains {c:?}; allowed are letters, digits and . _ : @ -",
            kind.name()
        )));
    }
    if kind == IdKind::Peer && s.starts_with("group:") {
        return Err(ProtoError::bad_request(
            "peer id may not start with \"group:\"",
        ));
    }
    Ok(())
}

pub fn validate_conv(s: &str) -> Result<(), ProtoError> {
    validate_id(IdKind::Conversation, s)
}

/// Idempotency keys are opaque but bounded and non-empty.
pub fn validate_key(s: &str) -> Result<(), ProtoError> {
    if s.is_empty() {
        return Err(ProtoError::bad_request("key is empty"));
    }
    if s.len() > KEY_BYTES_MAX {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!("key is {} bytes; the limit is {KEY_BYTES_MAX}", s.len()),
        ));
    }
    Ok(())
}

/// An id that can only be built by validating it: every entry point (JSON and binary frames,
/// HTTP, the Rust client, the simulator) builds one through [`validate_id`], and what carries
/// ids from the codec to the shard (`ClientOp`, `ShardOp`, `Target`) holds only these, so
/// none can skip a rule. Its wire and WAL form is the string, unchanged.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The id, if `s` is a valid one (else `bad_request` or `too_large`, saying why).
            pub fn new(s: &str) -> Result<$name, ProtoError> {
                validate_id($kind, s)?;
                Ok($name(s.into()))
            }

            /// An id written into the program (a constant, a test's literal): panics if it
            /// is not valid, which is the program's bug, never the input's.
            #[track_caller]
            pub fn must(s: &str) -> $name {
                match $name::new(s) {
                    Ok(id) => id,
                    Err(e) => panic!("{s:?} is not a valid id: {}", e.message),
                }
            }

            /// [`Self::new`] for an `Arc<str>` already held (no copy).
            pub fn from_arc(s: Arc<str>) -> Result<$name, ProtoError> {
                validate_id($kind, &s)?;
                Ok($name(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn as_arc(&self) -> &Arc<str> {
                &self.0
            }

            pub fn into_arc(self) -> Arc<str> {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ProtoError;
            fn try_from(s: &str) -> Result<$name, ProtoError> {
                $name::new(s)
            }
        }

        impl From<$name> for Arc<str> {
            fn from(id: $name) -> Arc<str> {
                id.0
            }
        }

        // Deserializing does not validate: postcard drops a custom error's message (and so
        // its code), so the binary decoder checks every id of a decoded op right after
        // (`codec::validate_binary_op`, an exhaustive match) and answers exactly as JSON
        // does; the other source, the WAL, is checksummed data this node validated before
        // writing it.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                Ok($name(<Arc<str>>::deserialize(d)?))
            }
        }
    };
}

id_type!(
    /// A mesh (tenant) id.
    MeshId,
    IdKind::Mesh
);
id_type!(
    /// A peer id (never starting with `group:`).
    PeerId,
    IdKind::Peer
);
id_type!(
    /// A conversation id.
    ConvId,
    IdKind::Conversation
);
id_type!(
    /// A group name.
    GroupId,
    IdKind::Group
);

/// Who an inbox message is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// One peer.
    Peer(PeerId),
    /// Every member of a group (the sender too if it is a member).
    Group(GroupId),
    /// Every member of the mesh except the sender.
    All,
}

impl Target {
    /// Parses the wire form: `peer-id`, `group:<name>` or `*`.
    pub fn parse(s: &str) -> Result<Target, ProtoError> {
        if s == "*" {
            return Ok(Target::All);
        }
        if let Some(g) = s.strip_prefix("group:") {
            return Ok(Target::Group(GroupId::new(g)?));
        }
        Ok(Target::Peer(PeerId::new(s)?))
    }

    /// The wire form.
    pub fn to_wire(&self) -> String {
        match self {
            Target::Peer(p) => p.to_string(),
            Target::Group(g) => format!("group:{g}"),
            Target::All => "*".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        // Proves the three target forms round-trip and reserved forms are refused as peer ids.
        for s in ["alice", "group:ops", "*"] {
            assert_eq!(Target::parse(s).unwrap().to_wire(), s);
        }
        assert!(Target::parse("group:").is_err());
        assert!(validate_id(IdKind::Peer, "group:x").is_err());
        assert!(validate_id(IdKind::Mesh, "a b").is_err());
        assert_eq!(
            validate_id(IdKind::Mesh, &"x".repeat(129))
                .unwrap_err()
                .code,
            ErrorCode::TooLarge
        );
    }
    #[test]
    fn typed_ids_are_built_only_by_validating_and_binary_frames_answer_as_json_does() {
        // Proves each id type refuses what validate_id refuses, with the same code, and that a
        // binary hello carrying a bad id (decoded without validation) is refused by the
        // binary decoder with the code and message a JSON hello gets.
        assert_eq!(MeshId::new("a b").unwrap_err().code, ErrorCode::BadRequest);
        let long = "x".repeat(129);
        assert_eq!(ConvId::new(&long).unwrap_err().code, ErrorCode::TooLarge);
        assert!(PeerId::from_arc("group:x".into()).is_err());
        assert!(GroupId::new("").is_err());
        assert_eq!(&*PeerId::must("alice"), "alice");
        for (mesh, code) in [
            ("a b", ErrorCode::BadRequest),
            (&*long, ErrorCode::TooLarge),
        ] {
            let hello = crate::ClientOp::Hello {
                mesh: MeshId(mesh.into()),
                peer: PeerId::must("p"),
                token: "t".into(),
            };
            let binary = crate::codec::encode_client_binary(&hello);
            let from_binary = crate::codec::decode_client_binary(&binary).unwrap_err();
            let json = format!(r#"{{"op":"hello","mesh":"{mesh}","peer":"p","token":"t"}}"#);
            let from_json = crate::codec::decode_client_json(json.as_bytes()).unwrap_err();
            assert_eq!(
                (from_binary.code, &from_binary.message),
                (code, &from_json.message)
            );
        }
    }
}
