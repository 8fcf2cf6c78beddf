//! High availability: `/v1/ha` (the fleet's HA state, and releasing
//! *held*), a host's lease state, hardware fence and maintenance, a VM's
//! HA state (and its wait on a disk lock), the peer witness.

use novacron_shared::ids::{HostId, VmId};
pub use novacron_shared::protocol::IsolationResponse;
use serde::{Deserialize, Serialize};

/// A host's HA lease, as the server judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Heard recently on a live session: holds its lease.
    Online,
    /// Heartbeats missed, disconnected, or not heard since the server
    /// started. Shown; nothing acts on it.
    Suspect,
    /// Silent for longer than the lease; its agent may not have fenced yet.
    LeaseExpired,
    /// Silent long enough that its agent must have stopped its HA VMs:
    /// they restart elsewhere.
    Fenced,
    /// Was fenced and is heard again: gets no lease until the VMs that
    /// moved are gone from it.
    Returning,
    /// Set by an operator: never fenced.
    Maintenance,
}

/// The mass-failure guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardState {
    /// Restarts proceed.
    Normal,
    /// Many hosts went silent at once: no restarts until hosts return or an
    /// operator releases it (`POST /v1/ha/release`).
    Held,
    /// Leaving held: fenced hosts are released one at a time.
    Releasing,
}

/// Why the guard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Held {
    /// Since when, Unix ms.
    pub since_ms: u64,
    /// Hosts that went silent together.
    pub silent: u64,
    /// Hosts monitored (not in maintenance).
    pub monitored: u64,
}

/// Where an HA VM of a fenced host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmHaState {
    /// Its restart on another host is being carried out.
    Restarting,
    /// Waiting to be restarted (`why` says for what).
    Waiting,
    /// Not HA (or not meant to run): lost until its host comes back.
    Lost,
}

/// One VM of a fenced host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FencedVm {
    /// The VM.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// The fenced host it is on.
    pub host: HostId,
    /// Where it stands.
    pub state: VmHaState,
    /// Why, for the operator.
    pub why: String,
    /// Since when, Unix ms.
    pub since_ms: u64,
}

/// One host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostLease {
    /// The host.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its lease.
    pub lease: LeaseState,
    /// Its hardware fence.
    #[serde(default)]
    pub fence: HostFence,
}

/// Where a host's hardware fence stands (`[ha.fence]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FenceState {
    /// Not fencing (or no hardware fence configured).
    #[default]
    Idle,
    /// Powering it off and confirming "off".
    Fencing,
    /// Confirmed off: its HA VMs restart at once.
    Off,
    /// The last round failed (an alert); retried when nothing else guards.
    Failed,
}

/// A host's hardware fence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostFence {
    /// Where it stands.
    pub state: FenceState,
    /// The last attempt's error.
    #[serde(default)]
    pub error: Option<String>,
}

/// A restarted HA VM whose start waits on its disk lock (another copy,
/// or its old host, still holds it): an expected wait, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LockWait {
    /// The VM.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// The host whose start of it waits.
    pub host: HostId,
    /// `disk lock held (on host H)`.
    pub waiting: String,
    /// Since when, Unix ms.
    pub since_ms: u64,
}

/// The peer witness (agents ask each other before fencing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WitnessOverview {
    /// On (`[ha.witness] enabled`).
    pub enabled: bool,
    /// Peers that must confirm the server is lost too.
    pub quorum: u32,
    /// Hosts reporting a witness address (the peers pushed).
    pub peers: u64,
    /// Witness terms pushed to sessions since the server started.
    pub pushes: u64,
}

/// `POST /v1/hosts/{host}/fence`: run the host's fence command now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FenceRequest {
    /// `status` or `off` (`on` is not offered: a host powered on while
    /// its VMs run elsewhere comes back as returning, but starting it is
    /// an operator's judgement outside the server).
    pub action: FenceAction,
}

/// What to ask a host's fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FenceAction {
    /// Report the power state (exit 0 = on, 2 = off).
    Status,
    /// Power it off (exit 0 = done).
    Off,
}

/// A power state as a fence's `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Exit 0.
    On,
    /// Exit 2.
    Off,
    /// Anything else, or a timeout.
    Unknown,
}

/// The fence command's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FenceReply {
    /// What was asked.
    pub action: FenceAction,
    /// Its exit code (absent: timed out, or could not run).
    pub exit_code: Option<i32>,
    /// It ran past the timeout and was killed.
    pub timed_out: bool,
    /// For `status`: what it says.
    pub power: Option<PowerState>,
    /// For `off`: it reported done (exit 0).
    pub done: Option<bool>,
    /// Its output (bounded), or why it could not run.
    pub output: String,
}

/// `GET /v1/ha`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HaOverview {
    /// Restarts are on (`[ha] enabled`).
    pub enabled: bool,
    /// The lease an acknowledged heartbeat buys, ms.
    pub lease_ms: u64,
    /// How long an agent may take to stop its HA VMs after its lease ends, ms.
    pub fence_time_ms: u64,
    /// From a host's last frame, how long until it counts as fenced, ms
    /// (the lease, the fence time, the clock-drift bound and a margin).
    pub fenced_after_ms: u64,
    /// The mass-failure guard.
    pub guard: GuardState,
    /// Why it holds, while it does.
    pub held: Option<Held>,
    /// Every host's lease.
    pub hosts: Vec<HostLease>,
    /// VMs of fenced hosts: restarting, waiting or lost.
    pub vms: Vec<FencedVm>,
    /// What isolated agents do with their HA VMs (`[ha] isolation`).
    #[serde(default)]
    pub isolation: IsolationResponse,
    /// HA VMs' disks are guarded by libvirt's lock manager
    /// (`[ha] disk_locks`).
    #[serde(default)]
    pub disk_locks: bool,
    /// A hardware fence is configured (`[ha.fence]`).
    #[serde(default)]
    pub hardware_fence: bool,
    /// Hosts whose hardware fence is not idle.
    #[serde(default)]
    pub fencing: Vec<HostLease>,
    /// Restarted VMs waiting on their disk lock.
    #[serde(default)]
    pub lock_waits: Vec<LockWait>,
    /// The peer witness.
    #[serde(default)]
    pub witness: WitnessOverview,
}

/// `PUT /v1/hosts/{host}/maintenance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMaintenance {
    /// In maintenance: the host is never fenced, its VMs never restarted
    /// elsewhere (its agent still stops its HA VMs when its lease ends).
    pub maintenance: bool,
}

/// A VM's HA history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmHa {
    /// Its placement epoch (raised by every restart elsewhere).
    pub epoch: u64,
    /// Restarts elsewhere so far.
    pub restarts: u64,
    /// The last one, Unix ms.
    pub last_restart_ms: Option<u64>,
    /// The host it was restarted from last.
    pub last_restart_from: Option<HostId>,
    /// While its host is fenced: where it stands and why.
    pub fenced: Option<FencedVm>,
    /// Restarted, and its start waits on its disk lock:
    /// `disk lock held (on host H)`.
    #[serde(default)]
    pub waiting: Option<String>,
}
