//! API tokens and join tokens: `/v1/api-tokens`, `/v1/join-tokens`.

use serde::{Deserialize, Serialize};

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Read and operate VMs.
    Operator,
    /// Everything, including tokens and hosts.
    Admin,
}

impl Role {
    /// The role as it is in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// `POST /v1/api-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    /// A name for people (1-63 of `a-z 0-9 -`, not starting or ending with `-`).
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiToken {
    /// Its id (the start of its hash).
    pub id: String,
    /// A name for people.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Created, Unix ms.
    pub created_ms: u64,
}

/// The reply to `POST /v1/api-tokens`: the secret, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedApiToken {
    /// Its id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// The bearer token (shown only here).
    pub token: String,
}

/// `GET /v1/api-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiTokenList {
    /// The tokens, by id.
    pub tokens: Vec<ApiToken>,
}

/// `DELETE /v1/api-tokens/{token}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeletedApiToken {
    /// The token as it was.
    pub deleted: ApiToken,
}

/// `POST /v1/join-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// How long it is valid (`90s`, `15m`, `1h`, `2d`; 1s to 30d; default 1h).
    #[serde(default)]
    #[schema(
        pattern = "^([1-9][0-9]{0,3}(s|m)|([1-9]|[1-9][0-9]|[1-6][0-9]{2}|7[01][0-9]|720)h|([1-9]|[12][0-9]|30)d)$"
    )]
    pub ttl: Option<String>,
}

/// The reply to `POST /v1/join-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// The one-time token a host joins with.
    pub token: String,
    /// When it expires, Unix ms.
    pub expires_ms: u64,
}
