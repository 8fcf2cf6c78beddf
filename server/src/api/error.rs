//! The API's error: an HTTP status, a stable [`ErrorCode`] and a message,
//! answered as [`novacron_api::ErrorBody`].

use std::time::Duration;

use hyper::StatusCode;
use novacron_api::ErrorCode;

/// An API error: HTTP status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// `Retry-After` (429).
    pub retry_after: Option<Duration>,
    /// `Allow` (405): the methods the path has.
    pub allow: Option<Vec<&'static str>>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }

    /// 400 with this code.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// 409 with this code.
    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500: the store failed.
    pub fn internal(e: &dyn std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Store, e.to_string())
    }

    /// 400 `invalid_query`.
    pub fn bad_query(message: impl Into<String>) -> Self {
        Self::bad_request(ErrorCode::InvalidQuery, message)
    }
}
