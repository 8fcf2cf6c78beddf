//! Hosts: `/v1/hosts`, one host, its VMs and commands.

use std::collections::BTreeMap;

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::protocol::{Capacity, CommandOutcome, Inventory, ReconcileReport, VmEvent};
use novacron_shared::spec::{DesiredVm, Power, VmSpec};
use serde::{Deserialize, Serialize};

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Joined, never connected yet.
    Enrolled,
    /// A session is open.
    Online,
    /// No session.
    Offline,
    /// Its certificates are refused.
    Revoked,
}

/// A host: its record and, while connected, its live session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Host {
    /// Its id (also in its certificate).
    pub id: HostId,
    /// Its name, as the host reported it.
    pub name: String,
    /// Addresses it connected from, most recent first.
    pub addresses: Vec<String>,
    /// What it offers.
    pub capacity: Capacity,
    /// The agent build it runs.
    pub agent_version: String,
    /// Enrollment time, Unix ms.
    pub first_seen_ms: u64,
    /// Last heartbeat or connection, Unix ms.
    pub last_seen_ms: u64,
    /// Where it stands.
    pub state: HostState,
    /// Serial of the newest certificate issued to it (hex).
    pub cert_serial: String,
    /// Expiry of that certificate, Unix seconds.
    pub cert_not_after: i64,
    /// Whether a session is open now.
    pub connected: bool,
    /// The negotiated protocol version of the open session.
    pub protocol_version: Option<u16>,
    /// VMs in the latest inventory.
    pub vm_count: Option<u64>,
    /// Cordoned: the scheduler places no new VMs here.
    pub cordoned: bool,
    /// The labels the host's agent reports (empty while disconnected).
    pub labels: BTreeMap<String, String>,
    /// Its HA lease, as the server judges it.
    pub lease: crate::ha::LeaseState,
    /// Its agent reports a shared storage pool (its directory).
    #[serde(default)]
    pub shared_storage: Option<String>,
    /// Its hardware fence (`[ha.fence]`).
    #[serde(default)]
    pub fence: crate::ha::HostFence,
    /// What it does with its HA VMs when its lease runs out (the fleet's
    /// `[ha] isolation`).
    #[serde(default)]
    pub isolation: crate::ha::IsolationResponse,
    /// Its agent reports disk locks (the lock space), if it does.
    #[serde(default)]
    pub disk_locks: Option<String>,
}

/// `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostList {
    /// Every host, by id.
    pub hosts: Vec<Host>,
}

/// `GET /v1/hosts/{host}/vms`: what should be, what is, and what the agent last said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostVms {
    /// The desired-state generation.
    pub generation: u64,
    /// The desired VMs.
    pub desired: Vec<DesiredVm>,
    /// The latest inventory (while connected).
    pub observed: Option<Inventory>,
    /// The latest reconcile report (while connected).
    pub report: Option<ReconcileReport>,
    /// Recent libvirt lifecycle events, oldest first.
    pub events: Vec<VmEvent>,
}

/// One VM in `PUT /v1/hosts/{host}/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    /// Its id; kept from an earlier request with the same name, or new.
    #[serde(default)]
    pub id: Option<VmId>,
    /// The spec.
    pub spec: VmSpec,
    /// The power state (default running).
    #[serde(default)]
    pub power: Power,
}

/// `PUT /v1/hosts/{host}/vms`: every VM the host should have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutHostVms {
    /// The VMs.
    pub vms: Vec<VmRequest>,
}

/// The reply to `PUT /v1/hosts/{host}/vms`: the host's new desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostDesired {
    /// Increases with every change.
    pub generation: u64,
    /// The VMs.
    pub vms: Vec<DesiredVm>,
    /// VMs in a live migration from or to this host.
    pub migrating: Vec<VmId>,
}

/// `POST /v1/hosts/{host}/commands`: a one-off command for the host's agent
/// (migrations go through `POST /v1/vms/{vm}/migrate`, which claims capacity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HostCommand {
    /// Re-read the hypervisor and send a fresh inventory.
    RefreshInventory,
    /// Reboot a running VM (ACPI).
    Reboot {
        /// The VM's id.
        vm: VmId,
    },
    /// Take an internal snapshot.
    SnapshotCreate {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
        name: String,
    },
    /// Revert to a snapshot.
    SnapshotRevert {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
        name: String,
    },
    /// Delete a snapshot.
    SnapshotDelete {
        /// The VM's id.
        vm: VmId,
        /// The snapshot's name.
        #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
        name: String,
    },
    /// Grow one of a VM's disks.
    ResizeDisk {
        /// The VM's id.
        vm: VmId,
        /// The disk's name in the spec.
        #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 32)]
        disk: String,
        /// The new size, MiB (never smaller than the current one).
        #[schema(minimum = 1, maximum = 67108864)]
        size_mib: u64,
    },
}

/// The reply to a command (`POST /v1/hosts/{host}/commands`, reboot, snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandReply {
    /// The command's operation id.
    pub op_id: OpId,
    /// How it ended.
    pub outcome: CommandOutcome,
}
