//! The audit log: `/v1/audit`.

use serde::{Deserialize, Serialize};

use crate::tokens::Role;

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Position in the log.
    pub seq: u64,
    /// When the request arrived, Unix ms.
    pub at_ms: u64,
    /// The token's name.
    pub actor: String,
    /// The token's id.
    pub token_id: String,
    /// The token's role.
    pub role: Role,
    /// The client address.
    pub remote: String,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// The HTTP status answered; absent while the request runs (or if the
    /// server stopped before answering).
    pub status: Option<u16>,
    /// `ok`, `running`, or the error code and message.
    pub outcome: String,
}

/// `GET /v1/audit`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditList {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last.
    pub next: Option<u64>,
}
