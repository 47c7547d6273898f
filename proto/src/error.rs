//! Stable error codes. The string form travels in JSON frames and HTTP bodies, the numeric form
//! in binary frames. Neither may ever be renumbered or renamed: clients switch on them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum ErrorCode {
    /// The frame or request could not be understood: malformed JSON, unknown op, missing field.
    BadRequest = 1,
    /// Hello with an unknown mesh or peer, or a wrong token; or an op before hello.
    Unauthorized = 2,
    /// Authenticated, but not allowed to do this.
    Forbidden = 3,
    /// The mesh, peer or conversation does not exist.
    NotFound = 4,
    /// The frame is over the size limit, or a field is over its limit.
    TooLarge = 5,
    /// The session sent more than its rate allows.
    RateLimited = 6,
    /// The node is shedding load; retry later.
    Overloaded = 7,
    /// The node cannot serve writes right now (shutting down, storage failed).
    Unavailable = 8,
    /// The request conflicts with existing state (the mesh or peer already exists).
    Conflict = 9,
    /// A bug. The message says what failed; the node keeps serving.
    Internal = 10,
    /// The shard's disk is full: writes are refused, reads still served; the shard retries
    /// writes by itself once space returns.
    StorageFull = 11,
    /// The recipient's (or the mesh's) unacknowledged inbox backlog is at its byte limit:
    /// nothing already accepted is dropped, new sends wait until recipients acknowledge.
    InboxFull = 12,
    /// Reserved for the Postgres archive: its write-behind backlog is full; retry later.
    ArchiveBacklogFull = 13,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::Conflict,
        ErrorCode::Internal,
        ErrorCode::StorageFull,
        ErrorCode::InboxFull,
        ErrorCode::ArchiveBacklogFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Internal => "internal",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::InboxFull => "inbox_full",
            ErrorCode::ArchiveBacklogFull => "archive_backlog_full",
        }
    }

    pub fn from_str_code(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status that carries this code on the REST API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Overloaded => 503,
            ErrorCode::Unavailable => 503,
            ErrorCode::Conflict => 409,
            ErrorCode::Internal => 500,
            ErrorCode::StorageFull => 507,
            ErrorCode::InboxFull => 429,
            ErrorCode::ArchiveBacklogFull => 503,
        }
    }
}

impl ErrorCode {
    /// Seconds for an HTTP `Retry-After` header on responses with this code, for the codes
    /// that mean "try again shortly" (the 503s and 429s a client should back off on).
    pub fn retry_after_secs(self) -> Option<u32> {
        match self {
            ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::ArchiveBacklogFull => {
                Some(1)
            }
            ErrorCode::InboxFull | ErrorCode::StorageFull => Some(5),
            _ => None,
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c as u16
    }
}

/// A number that names no error code (a newer node's, or garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0}")]
pub struct UnknownErrorCode(pub u16);

impl TryFrom<u16> for ErrorCode {
    type Error = UnknownErrorCode;
    fn try_from(n: u16) -> Result<ErrorCode, UnknownErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| *c as u16 == n)
            .ok_or(UnknownErrorCode(n))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its stable code and a message meant for a human.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ProtoError {
        ProtoError::new(ErrorCode::BadRequest, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_number_and_name() {
        // Proves every code maps to a unique number and name and back again.
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::try_from(c as u16).unwrap(), c);
            assert_eq!(ErrorCode::from_str_code(c.as_str()), Some(c));
        }
        assert!(ErrorCode::try_from(0).is_err());
        assert_eq!(ErrorCode::Internal as u16, 10, "codes are pinned");
        let pinned = [
            ("storage_full", 11, 507),
            ("inbox_full", 12, 429),
            ("archive_backlog_full", 13, 503),
        ];
        for (name, number, status) in pinned {
            let c = ErrorCode::from_str_code(name).expect("known name");
            assert_eq!(
                (c as u16, c.http_status()),
                (number, status),
                "{name} is pinned"
            );
        }
    }

    #[test]
    fn retry_after_is_sent_for_codes_worth_retrying_soon() {
        // Proves which codes carry an HTTP Retry-After header: the transient 503 ones.
        assert!(ErrorCode::ArchiveBacklogFull.retry_after_secs().is_some());
        assert!(ErrorCode::Unavailable.retry_after_secs().is_some());
        assert!(ErrorCode::BadRequest.retry_after_secs().is_none());
    }
}
