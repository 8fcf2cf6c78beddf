//! NovaCron's web API as types: every request and response body under
//! `/v1`, and the error body, shared by the server (which replies with
//! them), the `novacron` CLI and the dashboard (which read them).
//!
//! One module per resource. Requests refuse unknown fields; every enum is
//! lowercase or snake_case in JSON.

pub mod audit;
pub mod burst;
#[cfg(feature = "client")]
pub mod client;
pub mod error;
pub mod events;
pub mod ha;
pub mod hosts;
pub mod metrics;
pub mod operations;
pub mod tokens;
pub mod vms;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};

use serde::{Deserialize, Serialize};

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: HealthStatus,
}

/// The server's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Serving.
    Ok,
}

/// A request with no fields (an empty object, or no body at all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}
