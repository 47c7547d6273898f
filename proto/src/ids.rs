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

/// Who an inbox message is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// One peer.
    Peer(Arc<str>),
    /// Every member of a group (the sender too if it is a member).
    Group(Arc<str>),
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
            validate_id(IdKind::Group, g)?;
            return Ok(Target::Group(g.into()));
        }
        validate_id(IdKind::Peer, s)?;
        Ok(Target::Peer(s.into()))
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
}
