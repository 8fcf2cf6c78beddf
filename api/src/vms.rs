//! VMs: `/v1/vms`, one VM, its power, migration and snapshots.

use std::collections::BTreeMap;

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::placement::Placement;
use novacron_shared::protocol::VmObserved;
use novacron_shared::spec::{DesiredVm, Power, VmSpec};
use serde::{Deserialize, Serialize};

/// Where a VM may be placed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Put it on this host (skips the scheduler's scoring, not its filters).
    #[serde(default)]
    pub host: Option<HostId>,
    /// Labels the host must carry.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// Prefer hosts running VMs of this group.
    #[serde(default)]
    pub affinity: Option<String>,
    /// Never share a host with another VM of this group.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// When no host fits: keep it pending (placed as soon as a host fits)
    /// instead of refusing it with the scheduler's reasons. A burstable VM
    /// always waits.
    #[serde(default)]
    pub wait: bool,
    /// It may run in the cloud (the server's `[burst]`) when no host fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<novacron_shared::placement::BurstRule>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The spec.
    pub spec: VmSpec,
    /// The power state (default running).
    #[serde(default)]
    pub power: Power,
    /// Placement rules.
    #[serde(default)]
    pub placement: PlacementRules,
}

/// A VM: what it should be, where it is, and what its host last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vm {
    /// The VM, as its host's agent gets it.
    pub vm: DesiredVm,
    /// Where it is placed.
    pub placement: Placement,
    /// The host it is on, when it is on one (the same as `placement.host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostId>,
    /// The rules it was placed by.
    pub rules: PlacementRules,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// What its host last reported of it (absent while unknown).
    #[serde(default)]
    pub observed: Option<VmObserved>,
    /// Its HA history and state (HA VMs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<crate::ha::VmHa>,
    /// Its cloud side (burst VMs only): instance, state, cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<crate::burst::VmCloud>,
}

/// `GET /v1/vms`: a page of VMs by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmList {
    /// The VMs.
    pub vms: Vec<Vm>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<VmId>,
}

/// `DELETE /v1/vms/{vm}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeletedVm {
    /// The VM as it was.
    pub deleted: Vm,
}

/// `POST /v1/vms/{vm}/migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The target host; the scheduler picks one when absent.
    #[serde(default)]
    pub host: Option<HostId>,
}

/// `POST /v1/vms/{vm}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The snapshot's name (1-63 of `a-z 0-9 -`, not starting or ending with `-`).
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub name: String,
}
