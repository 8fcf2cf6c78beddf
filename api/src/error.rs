//! The error body every refused request gets:
//! `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// The stable code: what a program matches on.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
}

/// The stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No bearer token, a malformed one, or an unknown one (401).
    Unauthenticated,
    /// The token's role is not enough (403).
    Forbidden,
    /// The token sent too many requests (429, with `Retry-After`).
    RateLimited,
    /// No such route or resource (404).
    NotFound,
    /// The route exists, not with this method (405, with `Allow`).
    MethodNotAllowed,
    /// The body is not valid JSON for the call (400).
    InvalidBody,
    /// The body is larger than the server accepts (413).
    BodyTooLarge,
    /// A query parameter is invalid (400).
    InvalidQuery,
    /// An id in the path or query is malformed (400).
    InvalidId,
    /// A name is invalid (400).
    InvalidName,
    /// A VM spec is invalid (400).
    InvalidSpec,
    /// A VM with this name exists (409).
    NameTaken,
    /// No host can take the VM (409).
    NoCapacity,
    /// The VM or host is busy with something that must end first (409).
    Conflict,
    /// A host involved has no open session (409).
    NotConnected,
    /// The last admin token cannot be deleted (409).
    LastAdmin,
    /// The audit log cannot be written, so nothing was done (503).
    AuditUnavailable,
    /// Metric ingest is not running on this server (503).
    MetricsUnavailable,
    /// The request or the agent took too long (504).
    Timeout,
    /// The store failed (500).
    Store,
    /// A reply could not be encoded (500).
    Encode,
    /// A code this build does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it is in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidBody => "invalid_body",
            Self::BodyTooLarge => "body_too_large",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidId => "invalid_id",
            Self::InvalidName => "invalid_name",
            Self::InvalidSpec => "invalid_spec",
            Self::NameTaken => "name_taken",
            Self::NoCapacity => "no_capacity",
            Self::Conflict => "conflict",
            Self::NotConnected => "not_connected",
            Self::LastAdmin => "last_admin",
            Self::AuditUnavailable => "audit_unavailable",
            Self::MetricsUnavailable => "metrics_unavailable",
            Self::Timeout => "timeout",
            Self::Store => "store",
            Self::Encode => "encode",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names_and_unknown_ones_parse() {
        for code in [
            ErrorCode::RateLimited,
            ErrorCode::AuditUnavailable,
            ErrorCode::NotFound,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"m"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unknown);
    }
}
