//! Long-running operations (migrations, drains): `/v1/operations`.

use novacron_shared::ids::{HostId, OpId, VmId};
use serde::{Deserialize, Serialize};

/// What kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// Live-migrate one VM.
    Migrate,
    /// Cordon a host and live-migrate every VM off it.
    Drain,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Accepted, not started.
    Pending,
    /// Under way.
    Running,
    /// Finished as asked.
    Succeeded,
    /// Finished without doing what was asked; `error` says why.
    Failed,
}

impl OperationState {
    /// Whether the operation has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// How far an operation got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u8,
    /// What it is doing, for people.
    pub message: String,
}

/// A long-running operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    /// Its id.
    pub id: OpId,
    /// What it does.
    pub kind: OperationKind,
    /// The VM it moves (migrate).
    pub vm: Option<VmId>,
    /// The host it works on: the migration's source, the drained host.
    pub host: Option<HostId>,
    /// The migration's target.
    pub target: Option<HostId>,
    /// Where it stands.
    pub state: OperationState,
    /// How far it got.
    pub progress: Progress,
    /// Why it failed.
    pub error: Option<String>,
    /// The token name that asked for it.
    pub actor: String,
    /// Created, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

/// The reply to a request that started an operation (migrate, drain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationAccepted {
    /// The operation, as it started.
    pub operation: Operation,
}

/// `GET /v1/operations`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationList {
    /// The operations.
    pub operations: Vec<Operation>,
    /// Pass as `before` for the next page; absent on the last.
    pub next: Option<OpId>,
}
