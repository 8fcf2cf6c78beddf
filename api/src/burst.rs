//! Cloud burst: `/v1/burst` (the broker's caps, spend, instances, held VMs
//! and orphans) and a VM's cloud side (`Vm.cloud`).

use novacron_shared::ids::{HostId, VmId};
use serde::{Deserialize, Serialize};

/// Where a VM's instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloudState {
    /// The launch id is stored; the launch is asked for (or looked up by tag).
    Launching,
    /// The instance runs.
    Running,
    /// Asked to stop.
    Stopping,
    /// Stopped.
    Stopped,
    /// Asked to start again.
    Starting,
    /// Asked to terminate (the VM was deleted, brought home or released).
    Terminating,
}

/// A move home under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Repatriation {
    /// The host it goes to.
    pub host: HostId,
    /// When the move started, Unix ms.
    pub started_ms: u64,
    /// When the host's copy was first seen running, Unix ms (the instance
    /// is terminated from then on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_ms: Option<u64>,
}

/// A VM's cloud side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmCloud {
    /// The VM.
    pub vm: VmId,
    /// Its name (absent once the VM was deleted and only its instance is left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The provider (`aws`).
    pub provider: String,
    /// The launch decision's id (client token, `novacron:launch-id` tag).
    pub launch_id: String,
    /// Where it is in its life.
    pub state: CloudState,
    /// The instance id, once the provider named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The instance type.
    pub instance_type: String,
    /// The image (AMI).
    pub image: String,
    /// The provider's state name, as last described.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_state: Option<String>,
    /// Private address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// Public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// The type's price, USD per hour.
    pub usd_per_hour: f64,
    /// Cost accrued so far, USD (per second of running, a minute at least
    /// per run).
    pub accrued_usd: f64,
    /// When the burst was decided, Unix ms.
    pub decided_ms: u64,
    /// Why it burst (the scheduler's reasons).
    pub reasons: String,
    /// Calls tried for the current step.
    pub attempts: u32,
    /// The last error (a throttle, a server error), until a call succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The next retry, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
    /// A move home under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repatriation: Option<Repatriation>,
    /// The VM was deleted; its instance is being terminated.
    #[serde(default)]
    pub deleted: bool,
}

/// A VM waiting for capacity or for a burst, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingVm {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub name: String,
    /// Whether it may burst.
    pub burstable: bool,
    /// Why it waits (the scheduler's reasons, or the cap that stops its burst).
    pub reason: String,
}

/// An instance tagged with this fleet that no VM owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Orphan {
    /// The instance id.
    pub instance: String,
    /// Its type.
    pub instance_type: String,
    /// Its state.
    pub provider_state: String,
    /// Its `novacron:vm-id` tag, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_tag: Option<String>,
    /// First seen, Unix ms.
    pub first_seen_ms: u64,
    /// When it will be terminated, Unix ms (absent: only reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminate_at_ms: Option<u64>,
}

/// The caps and what is used of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BurstBudget {
    /// Instances at once, at most.
    pub max_instances: u32,
    /// Instances counted now (launching, running, stopped; not terminating).
    pub instances: u32,
    /// USD per hour, at most.
    pub max_usd_per_hour: f64,
    /// The summed hourly price of the counted instances.
    pub usd_per_hour: f64,
    /// USD per calendar month (UTC), at most.
    pub max_usd_per_month: f64,
    /// Spent this month, USD.
    pub month_usd: f64,
    /// The month, `yyyy-mm`.
    pub month: String,
}

/// `GET /v1/burst`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BurstStatus {
    /// Whether bursting is on.
    pub enabled: bool,
    /// The provider (`aws`), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Its region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The `novacron:fleet` tag value of this fleet's instances.
    pub fleet: String,
    /// Caps and use.
    pub budget: BurstBudget,
    /// Every VM with a cloud side.
    pub instances: Vec<VmCloud>,
    /// VMs waiting (for a host, or for a burst a cap stops).
    pub pending: Vec<PendingVm>,
    /// Instances of this fleet no VM owns.
    pub orphans: Vec<Orphan>,
    /// The fleet's cost accrued in the cloud since the server started
    /// counting, USD (every VM's, including deleted ones).
    pub total_usd: f64,
}
